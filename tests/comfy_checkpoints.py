"""Test support: random-weight single-file checkpoints that ComfyUI's stock loader detects as SD1.5 or SDXL.

ComfyUI recognises a model family from a few UNet dimensions (SD1.5: 320 model channels, 768-wide context, conv
projections, no class embedding; SDXL: 320 channels, 2048-wide context, 2816-wide class embedding), not from the
number of levels or where the attention sits, and builds CLIP and the VAE with fixed architectures. So these
checkpoints have small UNets with the detected dimensions and full-size random CLIP text encoders and VAE:

* SD1.5: three levels of 320 channels, one ResNet each, attention only at the lowest (1/4 of the latent grid: the
  16 x 16 grid whose cross-attention the method reads for a 512 px image, as in SD1.5), so no attention map at
  64 x 64 or 32 x 32 is computed or recorded;
* SDXL: SDXL's layout (no attention at the top level, transformer depths 1, 2, 10) at 320 channels throughout.

The weights are random; what they generate is noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ldm_checkpoint import save_single_file

CONFIGS = Path(__file__).resolve().parent.parent / "uce_core" / "backends" / "configs"


def _config(name: str, part: str) -> dict:
    return json.loads((CONFIGS / name / part / "config.json").read_text())


def mini_pipeline(kind: str, seed: int = 0):
    """A diffusers pipeline whose single-file form ComfyUI detects as ``kind`` ("sd15" or "sdxl")."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from concept_express.uce_core.backends.tiny import write_tiny_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(_config("sd1", "vae"))
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
        )
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_tokenizer(tmp, pad="<|endoftext|>")
            tokenizer = CLIPTokenizer.from_pretrained(tmp)
        if kind == "sd15":
            unet = UNet2DConditionModel(
                sample_size=64,
                block_out_channels=(320, 320, 320),
                layers_per_block=1,
                cross_attention_dim=768,
                attention_head_dim=8,
                down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            )
            text = CLIPTextModel(CLIPTextConfig(**_config("sd1", "text_encoder")))
            return StableDiffusionPipeline(
                vae=vae,
                text_encoder=text,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        if kind == "sdxl":
            unet = UNet2DConditionModel(
                sample_size=128,
                block_out_channels=(320, 320, 320),
                layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=5,
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
            text = CLIPTextModel(CLIPTextConfig(**_config("sdxl", "text_encoder")))
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_config("sdxl", "text_encoder_2")))
            return StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=text,
                text_encoder_2=text_2,
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                unet=unet,
                scheduler=scheduler,
            )
    raise ValueError(kind)


def save_comfy_checkpoint(kind: str, path, seed: int = 0) -> Path:
    """Write the ``kind`` checkpoint (float16) to ``path`` unless it is already there."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        save_single_file(mini_pipeline(kind, seed), {"sd15": "sd1", "sdxl": "sdxl"}[kind], tmp, dtype=torch.float16)
        tmp.rename(path)
    return path
