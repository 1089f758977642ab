"""The backend protocol on a diffusers Stable Diffusion pipeline (SD1.x, SD2.x, SDXL).

Text encoding with learnable vectors: a prompt is tokenized piece by piece, each ``Slot`` gets a placeholder id,
and a forward hook on the text encoder's token-embedding layer replaces the placeholder rows with the given
vectors (out of place, so autograd reaches the vectors and nothing else). The vocabulary is never resized and no
existing row is ever written.

Precision (``PRECISIONS``, ``resolve_precision``): the UNet and the text encoders always hold float32 weights; training
runs them under autocast in the policy's half precision (``autocast``), as the reference's accelerate
``--mixed_precision fp16`` does, and the VAE holds weights in that precision (float32 for SDXL's, which overflows in
float16). Capture and generation run without autocast, in float32. ``auto`` is ``fp16`` on CUDA, ``fp32`` elsewhere.

Attention recording: for one ``predict`` call every UNet attention module gets a processor that asks the recorder
whether it wants the layer; if it does the probabilities are computed explicitly (``attention.attention_with_probs``),
otherwise the module's own processor runs unchanged. The original processors are restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..attention import attention_with_probs, grid_of
from ..errors import ConceptExpressError
from .base import AttentionLayer, Conditioning, ModelInfo, NoiseSchedule, Prompt, Slot, TextEncoderInfo, TokenTap

PLACEHOLDER_ID = 0  # any real id works: its embedding row is replaced before the encoder sees it
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_ALIASES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_ALIASES.update({"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"})
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """What a precision policy means on one device for one model family."""

    name: str  # "fp32", "fp16" or "bf16" ("auto" resolved)
    autocast: torch.dtype | None  # training's autocast dtype for the text encoders and the UNet (weights stay float32)
    vae: torch.dtype  # the VAE's weights

    def describe(self, device: torch.device) -> str:
        compute = f"{self.name} autocast" if self.autocast is not None else "fp32"
        return f"{device.type}: UNet and text encoder fp32 weights, training in {compute}, VAE {_NAMES[self.vae]}"


_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def resolve_precision(policy, device: torch.device | str, family: str = "sd2") -> Precision:
    """``policy`` one of ``PRECISIONS`` (or a torch dtype / its name) -> the ``Precision`` used on ``device``."""
    device = torch.device(device)
    name = _ALIASES.get(policy, policy) if policy is not None else "auto"
    if name not in PRECISIONS:
        raise ConceptExpressError(f"precision must be one of {', '.join(PRECISIONS)}, not {policy!r}")
    if name == "auto":
        name = "fp16" if device.type == "cuda" else "fp32"
    if name == "fp32":
        return Precision("fp32", None, torch.float32)
    half = _HALF[name]
    vae = torch.float32 if (half == torch.float16 and family == "sdxl") else half  # SDXL's VAE overflows in fp16
    return Precision(name, half, vae)


def tokenize_prompt(tokenizer, prompt: Prompt, max_length: int, pad_id: int, bos_id: int, eos_id: int):
    """-> (ids[max_length], {slot: position}, end-of-text position). Raises ``ConceptExpressError`` if too long."""
    ids, slots = [bos_id], {}
    for part in prompt.parts:
        if isinstance(part, Slot):
            slots[part.index] = len(ids)
            ids.append(PLACEHOLDER_ID)
        elif part.strip():
            ids.extend(tokenizer(part.strip(), add_special_tokens=False).input_ids)
    if len(ids) + 1 > max_length:
        raise ConceptExpressError(
            f"the prompt is {len(ids) + 1} tokens long; at most {max_length} fit. Use fewer concepts or a shorter template."
        )
    eot = len(ids)
    ids = ids + [eos_id] + [pad_id] * (max_length - len(ids) - 1)
    return ids, slots, eot


class _EmbeddingSubstitution:
    """Forward hook on a token-embedding layer: rows at (batch, position) pairs are replaced by given vectors."""

    def __init__(self):
        self.rows = None  # (batch index, position, vector) tensors
        self.tapped = False  # add a zero leaf per prompt to the output (``TokenTap``), kept in ``taps``
        self.taps = []

    def __call__(self, module, inputs, output):
        if self.rows is not None:
            b, p, vectors = self.rows
            output = output.index_put((b, p), vectors.to(output.dtype))
        if self.tapped:
            self.taps = [torch.zeros_like(output[0]).requires_grad_() for _ in range(output.shape[0])]
            output = output + torch.stack(self.taps)
        return output


class DiffusersBackend:
    """``ModelBackend`` over a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``."""

    def __init__(
        self,
        pipe,
        info: ModelInfo,
        device: torch.device | str = "cpu",
        dtype="auto",
    ):
        self.pipe = pipe
        self.info = info
        self.device = torch.device(device)
        self.precision = resolve_precision(dtype, self.device, info.family)
        self.dtype = torch.float32  # the UNet's and the text encoders' weights (autocast does the rest)
        self.loss_scaling = self.precision.autocast == torch.float16
        self.unet = _placed(pipe.unet, self.device, self.dtype)
        self.vae = _placed(pipe.vae, self.device, self.precision.vae)
        self.tokenizers = [pipe.tokenizer] + (
            [pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) is not None else []
        )
        self.text_encoders = [pipe.text_encoder] + (
            [pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) is not None else []
        )
        self._hooks = []
        for encoder in self.text_encoders:
            _placed(encoder, self.device, self.dtype)
            hook = _EmbeddingSubstitution()
            encoder.get_input_embeddings().register_forward_hook(hook)
            self._hooks.append(hook)
        self.schedule = NoiseSchedule(pipe.scheduler.alphas_cumprod, info.prediction_type)
        self.vae_scaling = float(self.vae.config.scaling_factor)

    # -- the protocol ---------------------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.latent_distribution(pixels)[0]

    def latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(pixels.to(self.device, self.precision.vae)).latent_dist
        return (posterior.mean.float() * self.vae_scaling), (posterior.std.float() * self.vae_scaling)

    def modules(self) -> list[torch.nn.Module]:
        """The frozen models (their weights are in memory for the whole run)."""
        return [self.unet, self.vae, *self.text_encoders]

    def autocast(self):
        if self.precision.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.autocast)

    def add_noise(self, latents, noise, timesteps):
        return self.schedule.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        return self.schedule.target(latents, noise, timesteps)

    def token_embeddings(self, encoder: int) -> torch.Tensor:
        """The (vocabulary, width) token-embedding table of text encoder ``encoder`` (read only)."""
        return self.text_encoders[encoder].get_input_embeddings().weight.detach()

    def encode_prompts(
        self, prompts: Sequence[Prompt], vectors: Sequence[torch.Tensor] | None = None, *, tap: bool = False
    ) -> Conditioning:
        info = self.info
        hidden, pooled, slot_positions, eots = [], None, [], []
        taps = [[] for _ in prompts] if tap else None
        for e, (tokenizer, encoder, hook) in enumerate(zip(self.tokenizers, self.text_encoders, self._hooks)):
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else info.eos_token_id
            rows = [
                tokenize_prompt(tokenizer, p, info.max_length, pad, info.bos_token_id, info.eos_token_id)
                for p in prompts
            ]
            ids = torch.tensor([r[0] for r in rows], device=self.device)
            if e == 0:
                slot_positions, eots = [r[1] for r in rows], [r[2] for r in rows]
            hook.rows = self._substitutions(rows, vectors[e] if vectors is not None else None)
            hook.tapped = tap
            try:
                if info.family == "sdxl":
                    out = encoder(ids, output_hidden_states=True)
                    hidden.append(out.hidden_states[-2])
                    if e == 1:
                        pooled = out.text_embeds
                else:
                    hidden.append(encoder(ids).last_hidden_state)
            finally:
                hook.rows, hook.tapped = None, False
            if tap:
                for b, (r, leaf) in enumerate(zip(rows, hook.taps)):
                    table_ids = torch.tensor(r[0], device=self.device)
                    table_ids[list(r[1].values())] = -1  # slot positions read no table row
                    taps[b].append(TokenTap(e, table_ids, leaf))
                hook.taps = []
        context = torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0]
        extras = {"text_embeds": pooled} if pooled is not None else {}
        return Conditioning(
            context=context, extras=extras, slot_positions=slot_positions, eot_positions=eots, taps=taps
        )

    def predict(self, noisy, timesteps, cond: Conditioning, recorder=None) -> torch.Tensor:
        kwargs = {}
        if self.info.family == "sdxl":
            h, w = noisy.shape[-2] * self.info.vae_scale_factor, noisy.shape[-1] * self.info.vae_scale_factor
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=self.dtype).expand(
                noisy.shape[0], -1
            )
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond.extras["text_embeds"].to(self.dtype),
                "time_ids": time_ids,
            }
        context = cond.context.to(self.dtype)
        if context.shape[0] != noisy.shape[0]:
            raise ValueError(f"{noisy.shape[0]} latents but {context.shape[0]} prompts")
        with self._recording(recorder, tuple(noisy.shape[-2:])):
            out = self.unet(noisy.to(self.dtype), timesteps.to(self.device), encoder_hidden_states=context, **kwargs)
        return out.sample

    def sample(
        self,
        cond: Conditioning,
        uncond: Conditioning,
        *,
        steps: int,
        guidance: float,
        generator: torch.Generator,
        width: int,
        height: int,
    ):
        """Render one image with DDIM and classifier-free guidance (the reference's infer.py settings come from the
        caller) from precomputed conditioning; returns a PIL image."""
        from diffusers import DDIMScheduler
        from PIL import Image

        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config, prediction_type=self.info.prediction_type)
        scheduler.set_timesteps(steps)
        shape = (
            1,
            self.info.latent_channels,
            height // self.info.vae_scale_factor,
            width // self.info.vae_scale_factor,
        )
        latents = torch.randn(shape, generator=generator).to(self.device, torch.float32) * scheduler.init_noise_sigma
        both = Conditioning(
            torch.cat([uncond.context, cond.context]),
            {k: torch.cat([uncond.extras[k], v]) for k, v in cond.extras.items()},
        )
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(self.dtype)
                out_uncond, out_cond = self.predict(x, t.repeat(2).to(self.device), both).float().chunk(2)
                latents = scheduler.step(out_uncond + guidance * (out_cond - out_uncond), t, latents).prev_sample
            pixels = self.vae.decode((latents / self.vae_scaling).to(self.precision.vae)).sample.float()
        array = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)

    # -- internals ------------------------------------------------------------------------------------------
    def _substitutions(self, rows, vectors):
        places = [(b, pos, slot) for b, r in enumerate(rows) for slot, pos in r[1].items()]
        if not places:
            return None
        if vectors is None:
            raise ValueError("the prompts have learnable slots but no vectors were given")
        b = torch.tensor([p[0] for p in places], device=self.device)
        pos = torch.tensor([p[1] for p in places], device=self.device)
        slot = torch.tensor([p[2] for p in places], device=vectors.device)
        if vectors.ndim == 3:  # one copy of the vectors per prompt
            if vectors.shape[0] != len(rows):
                raise ValueError(f"{vectors.shape[0]} copies of the vectors for {len(rows)} prompts")
            return b, pos, vectors[b.to(vectors.device), slot].to(self.device)
        return b, pos, vectors[slot].to(self.device)

    @contextlib.contextmanager
    def _recording(self, recorder, latent_hw):
        if recorder is None:
            yield
            return
        originals = self.unet.attn_processors
        self.unet.set_attn_processor(
            {name: _RecordingProcessor(proc, recorder, latent_hw, _place(name)) for name, proc in originals.items()}
        )
        try:
            yield
        finally:
            self.unet.set_attn_processor(originals)


def _place(processor_name: str) -> str:
    """'down_blocks.2.attentions.0...' -> 'down'; 'mid_block...' -> 'mid'; 'up_blocks...' -> 'up'."""
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(processor_name.split(".")[0], "other")


def _placed(module, device, dtype):
    """Frozen, in eval mode, on ``device`` in ``dtype`` (moved only when it is not there already)."""
    param = next(module.parameters())
    if param.device != device:
        module.to(device)
    if param.dtype != dtype:
        module.to(dtype)
    return module.requires_grad_(False).eval()


class _RecordingProcessor:
    """Runs one attention module: explicitly (recording probabilities) when the recorder wants the layer,
    otherwise through the module's own processor."""

    def __init__(self, original, recorder, latent_hw, place):
        self.original, self.recorder, self.latent_hw, self.place = original, recorder, latent_hw, place

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        kind = "self" if encoder_hidden_states is None else "cross"
        spatial = hidden_states.ndim == 4
        queries = hidden_states.shape[-1] * hidden_states.shape[-2] if spatial else hidden_states.shape[1]
        layer = AttentionLayer(kind, grid_of(queries, self.latent_hw), self.place)
        if not self.recorder.wants(layer):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None or attn.spatial_norm is not None or getattr(attn, "norm_q", None) is not None:
            # SD1.x, SD2.x and SDXL UNets have none of these; a UNet that has them is another architecture
            raise ConceptExpressError(
                f"this UNet's {layer.kind}-attention at {layer.grid[0]}x{layer.grid[1]} uses an attention mask, spatial "
                "norm or query/key norm, which SD1.x, SD2.x and SDXL do not have: attention can only be captured "
                "from those model families."
            )
        residual = hidden_states
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        out, probs = attention_with_probs(
            attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads, attn.scale
        )
        self.recorder.record(layer, probs)
        out = attn.to_out[1](attn.to_out[0](out.to(hidden_states.dtype)))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def info_from_pipeline(pipe, name: str, prediction_type: str | None = None) -> ModelInfo:
    """Model family, encoders and tokenizer conventions of a diffusers pipeline."""
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(pipe, "text_encoder", None) is None or getattr(pipe, "vae", None) is None:
        raise ConceptExpressError(f"{name}: not a Stable Diffusion pipeline (needs unet, vae and text_encoder).")
    if unet.config.in_channels != 4:
        raise ConceptExpressError(
            f"{name}: the UNet takes {unet.config.in_channels} input channels; inpainting and other special UNets are "
            "not supported. Use a plain text-to-image SD1.x, SD2.x or SDXL checkpoint."
        )
    width1 = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if getattr(pipe, "text_encoder_2", None) is not None:
        family = "sdxl"
        encoders = (
            TextEncoderInfo("clip_l", width1),
            TextEncoderInfo("clip_g", pipe.text_encoder_2.get_input_embeddings().weight.shape[1]),
        )
    else:
        family = "sd2" if unet.config.use_linear_projection else "sd1"
        encoders = (TextEncoderInfo("clip_h" if family == "sd2" else "clip_l", width1),)
    tok = pipe.tokenizer
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return ModelInfo(
        family=family,
        prediction_type=prediction_type or pipe.scheduler.config.get("prediction_type", "epsilon"),
        text_encoders=encoders,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        max_length=min(77, pipe.text_encoder.config.max_position_embeddings),
        latent_channels=unet.config.in_channels,
        vae_scale_factor=vae_factor,
        resolution=int(unet.config.sample_size) * vae_factor,
        num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps),
        name=name,
    )
