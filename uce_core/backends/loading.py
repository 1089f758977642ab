"""Loading a model for the diffusers backend, fully offline.

``load_backend(model)`` accepts

* ``tiny-sd1`` / ``tiny-sd2`` / ``tiny-sdxl``: random-weight models built in code (tests and demos only);
* a diffusers folder (``model_index.json`` inside), loaded with ``local_files_only``;
* a single-file ``.safetensors`` / ``.ckpt`` checkpoint of SD1.x, SD2.x (512 base or 768-v) or SDXL base, loaded
  with the configs this project ships (``configs/``) and no hub access.

Single files carry no tokenizer. The CLIP tokenizer (the same vocabulary for every family; SD2 and SDXL's second
encoder pad with "!") is taken from, in order: ``tokenizer=``, the ``CONCEPT_EXPRESS_TOKENIZER`` environment
variable, a ComfyUI tree's ``comfy/sd1_tokenizer`` (``COMFYUI_PATH`` or an importable ``comfy``), the Hugging Face
cache (``openai/clip-vit-large-patch14`` or any cached SD model's ``tokenizer/``). If none is found the error says
where to get one.

SD2.x single files do not say whether they predict epsilon (512 base) or v (768-v). Unless ``prediction_type`` is
given, the file's ``modelspec.prediction_type`` metadata decides when present, else ComfyUI's rule: v-prediction iff
the standard deviation of ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` exceeds 0.09.
.ckpt files are read with ``torch.load(weights_only=True)``: nothing in them can execute.
"""

from __future__ import annotations

import contextlib
import glob
import os
from pathlib import Path

import torch

from ..errors import ConceptExpressError
from ..world.model import WEIGHTS as WORLD_WEIGHTS
from ..world.model import WORLD_MODEL
from .diffusers_backend import DiffusersBackend, info_from_pipeline, resolve_precision
from .tiny import CONFIG_DIR, TINY_MODELS, build_tiny_pipeline

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_UNET = "model.diffusion_model."
_V_PRED_PROBE = _UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device (None: cuda when available); one clear error for a name torch does not know or a
    device this machine does not have."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConceptExpressError(f"device {str(device)!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ConceptExpressError(
            f"device {device} is not available here (this torch sees "
            f"{torch.cuda.device_count()} CUDA device(s)); use --device cpu or another device."
        )
    return device


def load_backend(
    model: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    prediction_type: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    seed: int = 0,
) -> DiffusersBackend:
    """Load ``model`` (see the module docstring) into a ``DiffusersBackend``."""
    device = resolve_device(device)
    resolve_precision(dtype, device)  # a bad policy is an error before anything is loaded
    name = os.fspath(model)
    if name in TINY_MODELS:
        pipe = build_tiny_pipeline(name, seed)
    elif name == WORLD_MODEL:
        pipe = _load_folder(WORLD_WEIGHTS)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            pipe = _load_folder(path)
        elif path.is_file():
            pipe, prediction_type = _load_single_file(path, prediction_type, tokenizer, config)
        else:
            raise ConceptExpressError(
                f"{name}: no such file or folder. Give a single-file checkpoint (.safetensors/.ckpt), a diffusers "
                f"model folder, the bundled scene-world model '{WORLD_MODEL}', or one of the random-weight test "
                f"models {', '.join(TINY_MODELS)}."
            )
    info = info_from_pipeline(pipe, name, prediction_type)
    return DiffusersBackend(pipe, info, device=device, dtype=dtype or "auto")


@contextlib.contextmanager
def quiet_libraries():
    """Silence diffusers' and transformers' progress bars and advice while loading; restore afterwards."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def _load_folder(path: Path):
    import json

    from diffusers import DiffusionPipeline

    index = path / "model_index.json"
    if not index.is_file():
        raise ConceptExpressError(f"{path}: a folder without model_index.json is not a diffusers model folder.")
    try:
        cls = json.loads(index.read_text()).get("_class_name", "")
    except ValueError:
        raise ConceptExpressError(f"{index}: not valid JSON.") from None
    extra = {} if "XL" in cls else {"safety_checker": None, "requires_safety_checker": False}
    try:
        with quiet_libraries():
            return DiffusionPipeline.from_pretrained(path, local_files_only=True, **extra)
    except Exception as err:
        raise ConceptExpressError(
            f"{path}: could not load this diffusers folder ({type(err).__name__}: {err})."
        ) from None


# -- single files ------------------------------------------------------------------------------------------------


def read_checkpoint_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(key -> shape, metadata) without loading the tensors when the format allows it."""
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ConceptExpressError(f"{path}: expected a .safetensors or .ckpt Stable Diffusion checkpoint.")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
        state = _torch_load(path)
        return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}, {}
    except ConceptExpressError:
        raise
    except Exception as err:
        raise ConceptExpressError(
            f"{path}: the file is damaged or not a checkpoint ({type(err).__name__}: {err})."
        ) from None


def _torch_load(path: Path) -> dict:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ConceptExpressError(
            f"{path}: could not be read as plain tensors ({type(err).__name__}). Old .ckpt files sometimes hold Python "
            "objects that are unsafe to load; convert the checkpoint to .safetensors first."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConceptExpressError(f"{path}: expected a dictionary of tensors.")
    return state


def detect_family(shapes: dict[str, tuple[int, ...]], name: str = "checkpoint") -> str:
    """'sd1', 'sd2' or 'sdxl' from the key names of an original-layout checkpoint."""
    if not any(k.startswith(_UNET) for k in shapes):
        raise ConceptExpressError(
            f"{name}: no UNet inside (no 'model.diffusion_model.*' keys). Expected a full SD1.x, SD2.x or SDXL "
            "checkpoint, not a LoRA, VAE, embedding or diffusers component file."
        )
    conv_in = shapes.get(_UNET + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise ConceptExpressError(
            f"{name}: an inpainting or otherwise special UNet ({conv_in[1]} input channels) is not supported."
        )
    if any(k.startswith("conditioner.embedders.1.model.") for k in shapes):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        raise ConceptExpressError(f"{name}: this is an SDXL refiner; use an SDXL base checkpoint.")
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "sd1"
    raise ConceptExpressError(
        f"{name}: has a UNet but no text encoder this project recognises (expected 'cond_stage_model.*' for SD1.x/SD2.x "
        "or 'conditioner.embedders.*' for SDXL)."
    )


def _sd2_prediction_type(path: Path, metadata: dict[str, str]) -> str:
    spec = (metadata.get("modelspec.prediction_type") or "").lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if spec in ("epsilon", "eps"):
        return "epsilon"
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            probe = f.get_tensor(_V_PRED_PROBE) if _V_PRED_PROBE in f.keys() else None
    else:
        probe = _torch_load(path).get(_V_PRED_PROBE)
    if probe is not None and torch.std(probe.float(), unbiased=False) > 0.09:
        return "v_prediction"
    return "epsilon"


def find_tokenizer(explicit: str | os.PathLike | None = None) -> Path:
    """A folder holding the CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json); see the module docstring."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit).expanduser())
    if os.environ.get("CONCEPT_EXPRESS_TOKENIZER"):
        candidates.append(Path(os.environ["CONCEPT_EXPRESS_TOKENIZER"]).expanduser())
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]) / "comfy" / "sd1_tokenizer")
    try:
        import importlib.util

        spec = importlib.util.find_spec("comfy")
        if spec is not None and spec.submodule_search_locations:
            candidates.append(Path(list(spec.submodule_search_locations)[0]) / "sd1_tokenizer")
    except (ImportError, ValueError):
        pass
    hub = Path(
        os.environ.get("HF_HUB_CACHE")
        or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )
    patterns = [
        "models--openai--clip-vit-large-patch14/snapshots/*",
        "models--*stable-diffusion*/snapshots/*/tokenizer",
    ]
    for pattern in patterns:
        candidates.extend(Path(p) for p in sorted(glob.glob(str(hub / pattern))))
    for folder in candidates:
        if _is_tokenizer_folder(folder):
            return folder
    if explicit:
        raise ConceptExpressError(
            f"{explicit}: expected a folder with the CLIP tokenizer (vocab.json and merges.txt, or tokenizer.json)."
        )
    raise ConceptExpressError(
        "a single-file checkpoint has no tokenizer inside, and no CLIP tokenizer was found on this machine. Pass "
        "--tokenizer DIR with a folder holding vocab.json and merges.txt of the CLIP tokenizer: ComfyUI ships one in "
        "ComfyUI/comfy/sd1_tokenizer, and every diffusers Stable Diffusion folder has one in tokenizer/."
    )


def _is_tokenizer_folder(folder: Path) -> bool:
    return ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) or (
        folder / "tokenizer.json"
    ).is_file()


def _load_single_file(path: Path, prediction_type: str | None, tokenizer, config):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    shapes, metadata = read_checkpoint_header(path)
    family = detect_family(shapes, str(path))
    if config is None:
        if family == "sd2" and prediction_type is None:
            prediction_type = _sd2_prediction_type(path, metadata)
        config = CONFIG_DIR / {"sd1": "sd1", "sdxl": "sdxl"}.get(
            family, "sd2-v" if prediction_type == "v_prediction" else "sd2-base"
        )
    tok_dir = find_tokenizer(tokenizer)
    pad = "<|endoftext|>" if family == "sd1" else "!"
    components = {
        "tokenizer": CLIPTokenizer.from_pretrained(str(tok_dir), pad_token="<|endoftext|>" if family != "sd2" else "!")
    }
    if family == "sdxl":
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(str(tok_dir), pad_token=pad)
        cls = StableDiffusionXLPipeline
    else:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        cls = StableDiffusionPipeline
    try:
        with quiet_libraries():
            pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, **components)
    except Exception as err:
        raise ConceptExpressError(
            f"{path}: looked like a {family} checkpoint but could not be loaded with the {Path(config).name} config "
            f"({type(err).__name__}: {err}). If it is a different size of model, pass --config with a diffusers folder "
            "that matches it."
        ) from None
    if prediction_type is not None:
        pipe.scheduler.register_to_config(prediction_type=prediction_type)
    return pipe, prediction_type
