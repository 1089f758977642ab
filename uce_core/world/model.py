"""The world model: Stable Diffusion's architecture in miniature, trained by the project on the scene world.

* ``AutoencoderKL``: 128 px RGB <-> 4 x 16 x 16 latents (8x downsampling, like SD), trained on the world first;
* ``UNet2DConditionModel``: epsilon prediction, blocks of 64 / 128 / 128 channels, self- and cross-attention at
  16x16 and 8x8 (and the 4x4 mid block), linear projections like SD2.x;
* ``CLIPTextModel``: width 128, 4 layers, causal, over a CLIP-style byte-level BPE tokenizer whose merges make every
  word of the world one token; it pads with "!" (id 0) like SD2.x, so the empty prompt holds one end-of-text token.

``WORLD_MODEL`` ("world") is the name ``load_backend`` accepts for the shipped weights (``WEIGHTS``, a diffusers
folder in float16). The weights were made by this project (``python -m concept_express.uce_core.world.recipe``);
``weights/record.json`` says how.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..backends.tiny import learn_merges, write_tiny_tokenizer
from .scenes import SIZE, WORDS

WORLD_MODEL = "world"
WEIGHTS = Path(__file__).with_name("weights") / "model"
LATENT = SIZE // 8
TEXT_WIDTH = 128

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
    block_out_channels=(16, 32, 64, 64), sample_size=SIZE,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
UNET_CONFIG = dict(
    sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=16,
    block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_WIDTH, attention_head_dim=4, use_linear_projection=True,
)  # fmt: skip
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)  # fmt: skip


def world_merges() -> list[tuple[str, str]]:
    return learn_merges(WORDS, max_merges=1000)


def write_world_tokenizer(directory: str | os.PathLike) -> None:
    write_tiny_tokenizer(directory, pad="!", merges=world_merges())


def world_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_world_tokenizer(tmp)
        return CLIPTokenizer.from_pretrained(tmp)


def text_config():
    from transformers import CLIPTextConfig

    vocab = 512 + len(world_merges()) + 2
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=TEXT_WIDTH,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0,
    )  # fmt: skip


def build_parts(seed: int = 0):
    """Freshly initialised (vae, unet, text_encoder, tokenizer, scheduler), the same for the same seed."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**VAE_CONFIG)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text_encoder = CLIPTextModel(text_config())
    training = {k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "steps_offset")}
    return vae, unet, text_encoder, world_tokenizer(), DDPMScheduler(**training)


def assemble_pipeline(vae, unet, text_encoder, tokenizer):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def random_world_pipeline(seed: int = 0):
    """The world model's architecture with untrained weights: the control for what training taught it."""
    vae, unet, text_encoder, tokenizer, _ = build_parts(seed)
    return assemble_pipeline(vae.eval(), unet.eval(), text_encoder.eval(), tokenizer)
