"""The backend protocol on ComfyUI's MODEL (ModelPatcher), CLIP and VAE, for SD1.x, SD2.x and SDXL checkpoints
loaded by the stock loaders. Only this module and ``nodes/`` import ComfyUI, and only when used.

* Attention recording goes through ComfyUI's own hook: ``transformer_options["optimized_attention_override"]`` on
  a clone of the ModelPatcher; the layer's grid comes from ``activations_shape`` and its UNet part from ``block``.
  Nothing stays patched: the clone is dropped after the call.
* The denoiser runs through ``BaseModel.apply_model`` (ComfyUI's casting, patches and wrappers apply). It takes
  x_sigma = x_0 + sigma * eps and sigma and returns the x_0 estimate; the protocol's DDPM form x_t = sqrt(abar) x_0 +
  sqrt(1 - abar) eps is the same point scaled by sqrt(abar) = 1 / sqrt(1 + sigma^2), and the raw prediction
  (epsilon or v) is recovered exactly from (x_sigma, x_0 estimate).
* Text with learnable vectors goes through ComfyUI's CLIP (so CLIP-skip settings apply) as tensor tokens, the
  mechanism ComfyUI uses for textual inversion (with one copy of the vectors per prompt when asked; token taps are
  forward hooks on the encoders' token-embedding layers, present only during that call). ComfyUI's ``CLIPLayer``
  adds residuals in place, which autograd cannot differentiate, so while a prompt is encoded with gradients
  ``CLIPLayer.forward`` is swapped for an out-of-place version and restored right after.
* ComfyUI runs nodes under ``torch.inference_mode`` and its loaders make inference tensors, which autograd cannot
  save. ``prepare_for_training`` (called by the training node inside ``torch.inference_mode(False)``) replaces
  the model's and CLIP's inference-tensor weights by ordinary tensors with the same values, one at a time.
* Precision is ComfyUI's: its model management picks the weights' and the computation's dtypes for the device;
  nothing here casts or autocasts. When the UNet computes in float16 the training loss is scaled (``loss_scaling``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ..attention import attention_with_probs
from ..errors import ConceptExpressError
from .base import AttentionLayer, Conditioning, ModelInfo, NoiseSchedule, Prompt, Slot, TextEncoderInfo, TokenTap

_FAMILIES = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl"}
_ENCODERS = {"sd1": ("l",), "sd2": ("h",), "sdxl": ("l", "g")}
_PLACES = {"input": "down", "middle": "mid", "output": "up"}


def model_family(model) -> str:
    """'sd1' | 'sd2' | 'sdxl' for a ComfyUI MODEL, or ``ConceptExpressError``."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    name = type(config).__name__ if config is not None else type(model).__name__
    if name not in _FAMILIES:
        raise ConceptExpressError(
            f"this MODEL is {name}; ConceptExpress supports SD1.x, SD2.x and SDXL base checkpoints. "
            "Load one with Load Checkpoint."
        )
    return _FAMILIES[name]


class ComfyBackend:
    """``ModelBackend`` over ComfyUI objects. ``model`` is a MODEL (ModelPatcher), ``clip`` a CLIP, ``vae`` a VAE."""

    def __init__(self, model, clip, vae, name: str = "ComfyUI checkpoint"):
        import comfy.model_base
        import comfy.model_management

        family = model_family(model)
        self.model, self.clip, self.vae = model, clip, vae
        self.base = model.model
        self.device = comfy.model_management.get_torch_device()
        keys = _ENCODERS[family]
        missing = [k for k in keys if getattr(clip.tokenizer, f"clip_{k}", None) is None]
        if missing:
            raise ConceptExpressError(
                f"the CLIP input does not match the {family} MODEL; connect the CLIP of the same checkpoint."
            )
        self.tokenizers = [getattr(clip.tokenizer, f"clip_{k}") for k in keys]
        self.encoders = [getattr(clip.cond_stage_model, f"clip_{k}") for k in keys]
        v_pred = self.base.model_type == comfy.model_base.ModelType.V_PREDICTION
        widths = [e.transformer.get_input_embeddings().weight.shape[1] for e in self.encoders]
        first = self.tokenizers[0]
        self.info = ModelInfo(
            family=family,
            prediction_type="v_prediction" if v_pred else "epsilon",
            text_encoders=tuple(TextEncoderInfo(f"clip_{k}", w) for k, w in zip(keys, widths)),
            bos_token_id=first.start_token,
            eos_token_id=first.end_token,
            pad_token_id=first.pad_token,
            max_length=first.max_length,
            latent_channels=4,
            vae_scale_factor=8,
            resolution={"sd1": 512, "sd2": 768 if v_pred else 512, "sdxl": 1024}[family],
            name=name,
        )
        sigmas = self.base.model_sampling.sigmas.detach().double().cpu()
        self.schedule = NoiseSchedule(1.0 / (1.0 + sigmas**2), self.info.prediction_type)
        self.dtype = torch.float32
        compute = getattr(self.base, "manual_cast_dtype", None) or self.base.get_dtype()
        self.loss_scaling = compute == torch.float16

    def autocast(self):
        return contextlib.nullcontext()  # ComfyUI manages the dtypes

    def modules(self) -> list[torch.nn.Module]:
        """The models whose weights stay in memory (the UNet's BaseModel and the text encoders)."""
        return [self.base, *self.encoders]

    # -- images -----------------------------------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.latent_distribution(pixels)[0]

    def latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ComfyUI's VAE gives the posterior mode; the standard deviation is read from the encoder's moments when
        the VAE exposes them (SD-style AutoencoderKL), otherwise it is taken as zero (posterior mean only)."""
        image = ((pixels.float().cpu() + 1) / 2).clamp(0, 1).movedim(1, -1)
        mean = self.vae.encode(image).float()
        std = torch.zeros_like(mean)
        stage = getattr(self.vae, "first_stage_model", None)
        encoder, quant = getattr(stage, "encoder", None), getattr(stage, "quant_conv", None)
        if encoder is not None:
            with torch.no_grad(), contextlib.suppress(Exception):
                param = next(encoder.parameters())
                moments = encoder(pixels.to(param.device, param.dtype))
                if quant is not None:
                    moments = quant(moments)
                logvar = moments.float().chunk(2, dim=1)[1].clamp(-30.0, 20.0)
                if logvar.shape == mean.shape:
                    std = torch.exp(0.5 * logvar).cpu()
        scale = self.base.process_latent_in(torch.ones(1)).item()
        return self.base.process_latent_in(mean).to(self.device), (std * scale).to(self.device)

    def add_noise(self, latents, noise, timesteps):
        return self.schedule.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        return self.schedule.target(latents, noise, timesteps)

    def token_embeddings(self, encoder: int) -> torch.Tensor:
        return self.encoders[encoder].transformer.get_input_embeddings().weight.detach()

    # -- text -------------------------------------------------------------------------------------------------------
    def _token_list(self, tokenizer, prompt: Prompt, vectors):
        """One 77-token row as ComfyUI's CLIP takes it: token ids, with embedding tensors at the slots, padded the
        tokenizer's way."""
        ids = [] if tokenizer.start_token is None else [tokenizer.start_token]
        slots, positions = [], {}
        for part in prompt.parts:
            if isinstance(part, Slot):
                positions[part.index] = len(ids)
                ids.append(None)
                slots.append(part.index)
            elif part.strip():
                ids.extend(
                    t
                    for t in tokenizer.tokenizer(part.strip())["input_ids"]
                    if t not in (tokenizer.start_token, tokenizer.end_token)
                )
        if len(ids) + 1 > tokenizer.max_length:
            raise ConceptExpressError(f"the prompt is {len(ids) + 1} tokens long; at most {tokenizer.max_length} fit.")
        eot = len(ids)
        ids.append(tokenizer.end_token)
        pad = tokenizer.end_token if tokenizer.pad_with_end else tokenizer.pad_token
        ids += [pad] * (tokenizer.max_length - len(ids))
        slot_iter = iter(slots)
        row = [vectors[next(slot_iter)].float() if token is None else token for token in ids]
        return row, positions, eot

    def encode_prompts(
        self, prompts: Sequence[Prompt], vectors: Sequence[torch.Tensor] | None = None, *, tap: bool = False
    ) -> Conditioning:
        """All prompts in one batch per text encoder (one forward, one set of cast weights for autograd to keep),
        with the same set-up as ``CLIP.encode_from_tokens``: the CLIP's layer option (CLIP skip), its patcher
        loaded on its device. SDXL: CLIP-L and CLIP-G outputs side by side, CLIP-G's pooled output."""
        if vectors is None and any(p.slots for p in prompts):
            raise ValueError("the prompts have learnable slots but no vectors were given")
        rows, slot_positions, eots = [[] for _ in self.encoders], [], []
        for b, prompt in enumerate(prompts):
            for e, tokenizer in enumerate(self.tokenizers):
                mine = None
                if vectors is not None:
                    mine = vectors[e][b] if vectors[e].ndim == 3 else vectors[e]  # (B, S, W): a copy per prompt
                row, positions, eot = self._token_list(tokenizer, prompt, mine)
                rows[e].append(row)
            slot_positions.append(positions)
            eots.append(eot)
        clip, stage = self.clip, self.clip.cond_stage_model
        stage.reset_clip_options()
        if clip.layer_idx is not None:
            stage.set_clip_options({"layer": clip.layer_idx})
        clip.load_model()
        stage.set_clip_options({"execution_device": clip.patcher.load_device})
        grad = torch.is_grad_enabled() and vectors is not None and any(v.requires_grad for v in vectors)
        tapped = [[] for _ in self.encoders]
        with (
            _differentiable_clip() if grad else contextlib.nullcontext(),
            _token_taps(self.encoders, tapped) if tap and torch.is_grad_enabled() else contextlib.nullcontext(),
        ):
            outputs = [encoder.encode(batch) for encoder, batch in zip(self.encoders, rows)]
        length = min(o[0].shape[1] for o in outputs)
        context = torch.cat([o[0][:, :length] for o in outputs], dim=-1)
        pooled = outputs[-1][1]
        extras = {"pooled_output": pooled} if pooled is not None else {}
        taps = None
        if tap and all(len(t) == len(prompts) for t in tapped):  # one embedding call per prompt, in order
            taps = [[TokenTap(e, *tapped[e][b]) for e in range(len(self.encoders))] for b in range(len(prompts))]
        return Conditioning(context, extras, slot_positions, eots, taps)

    # -- the denoiser -----------------------------------------------------------------------------------------------
    def predict(self, noisy, timesteps, cond: Conditioning, recorder=None) -> torch.Tensor:
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.model])
        abar = self.schedule.alphas_cumprod[timesteps.detach().cpu().long()].to(self.device, torch.float32)
        sigma = ((1 - abar) / abar).sqrt()
        shape = (-1,) + (1,) * (noisy.ndim - 1)
        x_sigma = noisy.float().to(self.device) / abar.sqrt().view(shape)
        options = dict(self.model.model_options.get("transformer_options", {}))
        if recorder is not None:
            options["optimized_attention_override"] = _AttentionOverride(recorder)
        kwargs = {}
        if self.info.family == "sdxl":
            h, w = noisy.shape[-2] * 8, noisy.shape[-1] * 8
            kwargs["y"] = torch.cat(
                [
                    self.base.encode_adm(
                        pooled_output=p[None], width=w, height=h, crop_w=0, crop_h=0, target_width=w, target_height=h
                    )
                    for p in cond.extras["pooled_output"]
                ]
            )
        x0 = self.base.apply_model(
            x_sigma, sigma, c_crossattn=cond.context, transformer_options=options, **kwargs
        ).float()
        eps = (x_sigma - x0) / sigma.view(shape)
        if self.info.prediction_type == "epsilon":
            return eps
        return abar.sqrt().view(shape) * eps - (1 - abar).sqrt().view(shape) * x0


class _AttentionOverride:
    """``optimized_attention_override``: explicit probabilities for the layers the recorder wants."""

    def __init__(self, recorder):
        self.recorder = recorder

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        shape, block = options.get("activations_shape"), options.get("block")
        if args or kwargs.get("mask") is not None or kwargs.get("skip_reshape") or shape is None or block is None:
            return func(q, k, v, heads, *args, **kwargs)
        kind = "self" if k.shape[1] == q.shape[1] else "cross"
        layer = AttentionLayer(kind, (int(shape[-2]), int(shape[-1])), _PLACES.get(block[0], "other"))
        if layer.grid[0] * layer.grid[1] != q.shape[1] or not self.recorder.wants(layer):
            return func(q, k, v, heads, *args, **kwargs)
        out, probs = attention_with_probs(q, k, v, heads, (q.shape[-1] // heads) ** -0.5)
        self.recorder.record(layer, probs)
        return out.to(q.dtype)


@contextlib.contextmanager
def _token_taps(encoders, tapped):
    """Forward hooks on the encoders' token-embedding layers that add a zero leaf to each call's output and keep
    (ids read, leaf) in ``tapped[encoder]``; ComfyUI embeds each prompt's integer tokens in one call."""
    handles = []
    for e, encoder in enumerate(encoders):

        def hook(module, args, output, e=e):
            leaf = torch.zeros_like(output.reshape(-1, output.shape[-1])).requires_grad_()
            tapped[e].append((args[0].reshape(-1).to(output.device), leaf))
            return output + leaf.view_as(output)

        handles.append(encoder.transformer.get_input_embeddings().register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _differentiable_clip():
    """ComfyUI's CLIPLayer adds its residuals in place; use an out-of-place forward while gradients flow."""
    import comfy.clip_model

    layer = comfy.clip_model.CLIPLayer
    original = layer.forward

    def forward(self, x, mask=None, optimized_attention=None):
        x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
        return x + self.mlp(self.layer_norm2(x))

    layer.forward = forward
    try:
        yield
    finally:
        layer.forward = original


def prepare_for_training(*modules) -> int:
    """Replace inference-mode parameters and buffers of ``modules`` by ordinary tensors with the same values (call
    inside ``torch.inference_mode(False)``). Returns how many tensors were replaced."""
    replaced = 0
    for root in modules:
        for module in root.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and param.is_inference():
                    module._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
                    replaced += 1
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    module._buffers[name] = buffer.clone()
                    replaced += 1
    return replaced
