"""Tiny random-weight Stable Diffusion models, built from configs in code: ``tiny-sd1``, ``tiny-sd2``, ``tiny-sdxl``.

THEIR WEIGHTS ARE RANDOM. They have the architecture of the real families at a few-percent scale (same block
layout, attention at 1/1, 1/2, 1/4 of the latent grid for SD1/SD2 and 1/2, 1/4 for SDXL, one or two CLIP text
encoders, the same tokenizer conventions) so that every code path runs offline in seconds on a CPU. Whatever
they "extract" from an image is not a real concept; use them for tests and demos only, and bring a real
checkpoint for real work.

* ``tiny-sd1``: epsilon prediction, one CLIP text encoder (width 32), pads with <|endoftext|> like SD1.x.
* ``tiny-sd2``: v-prediction (like SD2.x 768-v), one encoder (width 48), linear projections, pads with "!" (id 0).
* ``tiny-sdxl``: epsilon, two encoders (32 + 64, the second with a projection), text_time conditioning.

The tokenizer is made by the project: the 256 byte symbols of CLIP's byte-level BPE, the same with ``</w>``, a
few hundred merges learned from a small built-in word list, then ``<|startoftext|>`` and ``<|endoftext|>``. It
follows CLIP's layout, so "!" is id 0 and the end-of-text token is the last id.

Everything is deterministic given ``seed``. The query/key projections of the UNet's attention are scaled up
(``ATTENTION_SHARPNESS``) so that random-weight attention depends on the image instead of being nearly uniform;
this only makes the demo previews readable.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"  # the architectures' configs: SD1.x, SD2.x, SDXL (also loading's)

TINY_MODELS = ("tiny-sd1", "tiny-sd2", "tiny-sdxl")
TINY_RESOLUTION = 128  # pixels; latent grid 16x16
ATTENTION_SHARPNESS = 4.0

_WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "and",
    "in",
    "on",
    "with",
    "at",
    "by",
    "for",
    "from",
    "to",
    "an",
    "is",
    "this",
    "that",
    "my",
    "your",
    "its",
    "one",
    "two",
    "three",
    "dog",
    "cat",
    "teapot",
    "lamp",
    "cup",
    "chair",
    "table",
    "car",
    "tree",
    "flower",
    "bird",
    "house",
    "person",
    "man",
    "woman",
    "child",
    "ball",
    "box",
    "book",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "brown",
    "small",
    "large",
    "big",
    "little",
    "old",
    "new",
    "wooden",
    "metal",
    "glass",
    "beach",
    "snow",
    "forest",
    "city",
    "street",
    "room",
    "garden",
    "sky",
    "water",
    "mountain",
    "river",
    "field",
    "painting",
    "picture",
    "image",
    "rendering",
    "style",
    "standing",
    "sitting",
    "next",
    "behind",
    "front",
    "under",
    "over",
    "near",
]


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte-level alphabet: each byte maps to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def learn_merges(words=_WORDS, max_merges: int = 400) -> list[tuple[str, str]]:
    """Plain BPE on a word list (each word ends with </w>), most frequent pair first, ties by lexical order."""
    corpus = collections.Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs = collections.Counter()
        for word, count in corpus.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for word, count in corpus.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        corpus = merged
    return merges


def write_tiny_tokenizer(directory: str | os.PathLike, pad: str, merges: list[tuple[str, str]] | None = None) -> None:
    """Write vocab.json, merges.txt and the tokenizer configs of the project's small CLIP-style tokenizer (the
    merges learned from the built-in word list unless ``merges`` are given)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    merges = learn_merges() if merges is None else merges
    vocab_list = (
        symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    )
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    config = dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def tiny_vocab_size() -> int:
    return 512 + len(learn_merges()) + 2


def _text_config(width: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig

    vocab = tiny_vocab_size()
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or width,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )


_UNET_SD = dict(
    sample_size=TINY_RESOLUTION // 8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    block_out_channels=(8, 16, 16, 16),
    sample_size=TINY_RESOLUTION,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def build_tiny_pipeline(name: str = "tiny-sd1", seed: int = 0):
    """A diffusers pipeline with random weights, the same for the same (name, seed)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    import tempfile

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_tokenizer(tmp, pad="<|endoftext|>" if name == "tiny-sd1" else "!")
            tokenizer = CLIPTokenizer.from_pretrained(tmp)
            if name == "tiny-sdxl":
                write_tiny_tokenizer(os.path.join(tmp, "2"), pad="!")
                tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "2"))
        vae = AutoencoderKL(**_VAE, scaling_factor=0.13025 if name == "tiny-sdxl" else 0.18215)
        if name == "tiny-sd1":
            text_encoder = CLIPTextModel(_text_config(32, "quick_gelu"))
            unet = UNet2DConditionModel(**_UNET_SD, cross_attention_dim=32, attention_head_dim=2)
            prediction = "epsilon"
        elif name == "tiny-sd2":
            text_encoder = CLIPTextModel(_text_config(48, "gelu"))
            unet = UNet2DConditionModel(
                **_UNET_SD, cross_attention_dim=48, attention_head_dim=(1, 2, 2, 2), use_linear_projection=True
            )
            prediction = "v_prediction"
        else:
            text_encoder = CLIPTextModel(_text_config(32, "quick_gelu"))
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(64, "gelu", projection=64))
            unet = UNet2DConditionModel(
                sample_size=TINY_RESOLUTION // 8,
                in_channels=4,
                out_channels=4,
                layers_per_block=1,
                norm_num_groups=8,
                block_out_channels=(16, 32, 32),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 1, 2),
                attention_head_dim=(1, 2, 2),
                cross_attention_dim=96,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=64 + 6 * 8,
            )
            prediction = "epsilon"
        _sharpen_attention(unet)
    scheduler = DDIMScheduler(**_SCHEDULER, prediction_type=prediction)
    for module in (vae, unet, text_encoder):
        module.eval()
    if name == "tiny-sdxl":
        text_encoder_2.eval()
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=False,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_model(name: str, directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny model as a diffusers folder (what ``--model DIR`` loads)."""
    directory = Path(directory)
    build_tiny_pipeline(name, seed).save_pretrained(directory, safe_serialization=True)
    return directory


def _sharpen_attention(unet) -> None:
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight")):
                param.mul_(ATTENTION_SHARPNESS**0.5)


def build_random_pipeline(config: str = "sd2-base", seed: int = 0):
    """A full-size pipeline (SD1.5, SD2.1 base / 768-v or SDXL architecture, from the shipped configs) with RANDOM
    weights and the project's small tokenizer: for benchmarks of speed and memory at real sizes, nothing else."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = CONFIG_DIR / config
    if not root.is_dir():
        raise ValueError(f"unknown config {config!r}; choose one of {sorted(p.name for p in CONFIG_DIR.iterdir())}")

    def load(part):
        return json.loads((root / part / "config.json").read_text())

    def text_config(part):
        cfg = load(part)
        cfg.update(bos_token_id=tiny_vocab_size() - 2, eos_token_id=tiny_vocab_size() - 1)
        return CLIPTextConfig(**cfg)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_tokenizer(tmp, pad="<|endoftext|>" if config == "sd1" else "!")
            tokenizer = CLIPTokenizer.from_pretrained(tmp)
        unet = UNet2DConditionModel.from_config(load("unet")).eval()
        vae = AutoencoderKL.from_config(load("vae")).eval()
        text_encoder = CLIPTextModel(text_config("text_encoder")).eval()
        sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        scheduler = DDIMScheduler(**{k: v for k, v in sched_cfg.items() if k in _SCHEDULER or k == "prediction_type"})
        if config == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection(text_config("text_encoder_2")).eval()
            return StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                unet=unet,
                scheduler=scheduler,
            )
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
