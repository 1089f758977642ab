"""What the method needs from a diffusion model: one small protocol, two implementations (diffusers, ComfyUI).

A backend can

* encode an image to scaled latents (the posterior mean at capture; training also draws posterior samples);
* add noise at timesteps, and give the training target for the model's prediction type (epsilon or v);
* encode prompts in which some positions are learnable vectors (``Prompt`` slots); gradients reach those vectors
  only, one vector per slot per text encoder (SDXL has two encoders, so two vectors per slot). The vectors are
  shared by all prompts, or each prompt has its own copy (so that one backward pass yields every prompt's gradient
  apart). On request, the embeddings of the prompt's ordinary tokens get zero-valued taps (``TokenTap``) whose
  gradients are those of the embedding-table rows they were read from (what the reference's gradient clipping
  counts);
* run the text encoder and the denoiser under the backend's mixed precision for training (``autocast``);
* run the denoiser on (latents, timesteps, conditioning), optionally calling an ``AttentionRecorder`` with the
  attention probabilities (averaged over heads) of the layers the recorder asks for;
* report the model family, its text encoders and their widths, and its tokenizer conventions (``ModelInfo``).

Everything else in ``uce_core`` is model-agnostic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import torch

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class TextEncoderInfo:
    """One text encoder: its name in exported embedding files and its token-embedding width."""

    key: str  # "clip_l" (SD1.x, SDXL's first), "clip_h" (SD2.x), "clip_g" (SDXL's second)
    width: int


@dataclass(frozen=True)
class ModelInfo:
    family: str  # one of FAMILIES
    prediction_type: str  # one of PREDICTION_TYPES
    text_encoders: tuple[TextEncoderInfo, ...]
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int  # SD1.x pads with the end-of-text token, SD2.x and SDXL's second tokenizer with "!" (id 0)
    max_length: int = 77
    latent_channels: int = 4
    vae_scale_factor: int = 8  # pixels per latent cell
    resolution: int = 512  # native training resolution, pixels
    num_train_timesteps: int = 1000
    name: str = ""  # where the model came from (path or tiny model name), for provenance

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, not {self.family!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {self.prediction_type!r}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(e.width for e in self.text_encoders)


@dataclass(frozen=True)
class Slot:
    """A learnable position in a prompt: it takes row ``index`` of the vectors passed to ``encode_prompts``."""

    index: int


@dataclass(frozen=True)
class Prompt:
    """A prompt as text pieces and learnable slots, e.g. ("a photo of", Slot(0), "and", Slot(1))."""

    parts: tuple[str | Slot, ...]

    @classmethod
    def text(cls, text: str) -> Prompt:
        return cls((text,))

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(p.index for p in self.parts if isinstance(p, Slot))


@dataclass
class TokenTap:
    """Zeros added to the embeddings that one prompt reads from a text encoder's token table (not its slots).

    ``ids[j]`` is the table row read at tapped position j (-1: not a table row); after a backward pass,
    ``tap.grad[j]`` is the loss's gradient with respect to that use of the row, so the gradient of row r of the
    table is the sum of ``tap.grad[j]`` over the positions with ``ids[j] == r`` (``table_grad_sq`` in
    ``uce_core/optim.py``).
    """

    encoder: int
    ids: torch.Tensor  # (L,) long
    tap: torch.Tensor  # (L, width) leaf, requires grad


@dataclass
class Conditioning:
    """Text conditioning for a batch of prompts.

    ``context``: (B, 77, D) cross-attention keys/values input; ``extras``: family-specific tensors (SDXL: pooled
    text embeddings); ``slot_positions``: for each prompt, {slot index: token position}, and ``eot_positions``: the
    position of each prompt's end-of-text token, so that a token's column can be found in a cross-attention map.
    """

    context: torch.Tensor
    extras: dict = field(default_factory=dict)
    slot_positions: list[dict[int, int]] = field(default_factory=list)
    eot_positions: list[int] = field(default_factory=list)
    taps: list[list[TokenTap]] | None = None  # per prompt, one per text encoder, when ``encode_prompts(tap=True)``


class AttentionLayer(NamedTuple):
    """Where an attention call happens: ``kind`` "self" or "cross", ``grid`` the (h, w) of its query positions,
    ``place`` "down", "mid" or "up" (the UNet part; the reference reads cross-attention from "down" and "up")."""

    kind: str
    grid: tuple[int, int]
    place: str


@runtime_checkable
class AttentionRecorder(Protocol):
    """Receives attention probabilities during a denoiser call.

    ``wants`` is asked once per attention call; when it answers True the backend computes the probabilities
    explicitly and calls ``record`` with their mean over heads, shape (B, h*w, keys), in float32 (differentiable
    when gradients are on). Otherwise the layer runs the normal fused attention and nothing is materialised.
    """

    def wants(self, layer: AttentionLayer) -> bool: ...

    def record(self, layer: AttentionLayer, probs: torch.Tensor) -> None: ...


@runtime_checkable
class ModelBackend(Protocol):
    info: ModelInfo
    device: torch.device
    loss_scaling: bool  # gradients pass through float16 activations: training scales the loss (as torch's GradScaler)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/8, W/8), the posterior mean."""
        ...

    def latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's (mean, standard deviation), both scaled like the latents."""
        ...

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict: the noise (epsilon) or the velocity (v)."""
        ...

    def encode_prompts(
        self, prompts: Sequence[Prompt], vectors: Sequence[torch.Tensor] | None = None, *, tap: bool = False
    ) -> Conditioning:
        """Encode prompts; slot k of prompt b takes ``vectors[e][k]`` in text encoder e when ``vectors[e]`` is one
        (num_slots, width_e) tensor shared by all prompts, or ``vectors[e][b, k]`` when it is (B, num_slots, width_e),
        one copy per prompt. Gradients flow to ``vectors`` (and, with ``tap``, to ``Conditioning.taps``) and nowhere
        else."""
        ...

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed precision training runs under (text encoder and denoiser); a no-op context when there is none."""
        ...

    def modules(self) -> list[torch.nn.Module]:
        """The frozen models, whose weights are in memory anyway (the training memory estimate leaves them out)."""
        ...

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        recorder: AttentionRecorder | None = None,
    ) -> torch.Tensor:
        """Run the denoiser; call ``recorder`` for the attention layers it wants."""
        ...

    def token_embeddings(self, encoder: int) -> torch.Tensor:
        """The (vocabulary, width) token-embedding table of text encoder ``encoder``, read only (token
        initialisation draws from its statistics)."""
        ...


class NoiseSchedule:
    """The DDPM forward process both backends share, from the model's cumulative alphas (abar_t).

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; the target is eps for epsilon models and
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 for v-prediction models.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        self.prediction_type = prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor):
        abar = self.alphas_cumprod[timesteps.detach().cpu().long()].to(device=like.device, dtype=torch.float32)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().view(shape).to(like.dtype), (1 - abar).sqrt().view(shape).to(like.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(timesteps, latents)
        return a * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        a, s = self._coefficients(timesteps, latents)
        return a * noise - s * latents
