"""Test support: write a diffusers Stable Diffusion pipeline as an original single-file (LDM / SGM layout)
checkpoint, the format users download as ``model.safetensors``.

It is the inverse of the naming diffusers' single-file loader reads; tests check it by loading the written file
back through diffusers and comparing every tensor with the pipeline it came from. Tests use it to make tiny
single-file checkpoints (and, for ComfyUI, checkpoints its stock loader detects as SD1.5 / SDXL).
"""

from __future__ import annotations

import re

import torch

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    cfg = unet.config
    per = cfg.layers_per_block + 1
    out = {}
    for key, value in unet.state_dict().items():
        new = _unet_key(key, per, cfg)
        out["model.diffusion_model." + new] = value
    return out


def _unet_key(key: str, per: int, cfg) -> str:
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for a, b in fixed.items():
        if key.startswith(a + "."):
            return b + key[len(a) :]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + i * per + j
        return f"input_blocks.{block}.{0 if kind == 'resnets' else 1}.{_inner(kind, rest)}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        index = 1 if kind == "attentions" else 2 * j
        return f"middle_block.{index}.{_inner(kind, rest)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * per + j}.{0 if kind == 'resnets' else 1}.{_inner(kind, rest)}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        i = int(m[1])
        has_attention = "CrossAttn" in cfg.up_block_types[i]
        return f"output_blocks.{i * per + per - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def _inner(kind: str, rest: str) -> str:
    if kind == "attentions":
        return rest
    name, _, tail = rest.partition(".")
    return f"{_RESNET[name]}.{tail}"


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}", new
        )
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample", new
        )
        new = re.sub(
            r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}", new
        )
        new = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0", r"\1.mid.attn_1", new)
        new = new.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            new = (
                new.replace(".group_norm.", ".norm.")
                .replace(".to_q.", ".q.")
                .replace(".to_k.", ".k.")
                .replace(".to_v.", ".v.")
                .replace(".to_out.0.", ".proj_out.")
            )
            if new.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP layout (SD1.x text encoder, SDXL's first)."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}


def open_clip_to_ldm(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP layout (SD2.x text encoder, SDXL's second)."""
    sd = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    hidden = sd["final_layer_norm.weight"].shape[0]
    out[prefix + "text_projection"] = (
        sd["text_projection.weight"].T.contiguous() if "text_projection.weight" in sd else torch.eye(hidden)
    )
    layers = sorted({int(m[1]) for k in sd for m in [re.match(r"encoder\.layers\.(\d+)\.", k)] if m})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = sd[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = sd[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = sd[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
    return out


def pipeline_to_ldm(pipe, family: str) -> dict[str, torch.Tensor]:
    state = {}
    state.update(unet_to_ldm(pipe.unet))
    state.update(vae_to_ldm(pipe.vae))
    if family == "sd1":
        state.update(clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer."))
    elif family == "sd2":
        state.update(open_clip_to_ldm(pipe.text_encoder, "cond_stage_model.model."))
    elif family == "sdxl":
        state.update(clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        raise ValueError(family)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_single_file(pipe, family: str, path, dtype=None) -> None:
    from safetensors.torch import save_file

    state = pipeline_to_ldm(pipe, family)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    save_file(state, str(path))
