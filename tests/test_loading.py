"""Model loading, fully offline: tiny names, diffusers folders, single-file checkpoints (SD1.x / SD2.x / SDXL)."""

import json
import pickle

import pytest
import torch
from ldm_checkpoint import pipeline_to_ldm, save_single_file
from safetensors.torch import save_file

from concept_express.uce_core.backends.loading import CONFIG_DIR, detect_family, find_tokenizer, load_backend
from concept_express.uce_core.backends.tiny import build_tiny_pipeline, save_tiny_model
from concept_express.uce_core.errors import ConceptExpressError

FAMILY = {"tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """For each tiny model: its diffusers folder and the same weights as an original-layout single file."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, family in FAMILY.items():
        folder = save_tiny_model(name, root / name)
        path = root / f"{name}.safetensors"
        save_single_file(build_tiny_pipeline(name), family, path)
        out[name] = (folder, path)
    return out


def _components(pipe):
    return [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_single_file_loads_every_weight_exactly(tiny_files, name):
    folder, path = tiny_files[name]
    backend = load_backend(path, config=folder, tokenizer=folder / "tokenizer", device="cpu")
    reference = build_tiny_pipeline(name)
    assert backend.info.family == FAMILY[name]
    assert backend.info.prediction_type == reference.scheduler.config.prediction_type
    for component in _components(reference):
        expected, got = getattr(reference, component).state_dict(), getattr(backend.pipe, component).state_dict()
        assert expected.keys() == got.keys(), component
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{component}.{key}"


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_diffusers_folder_loads_with_its_info(tiny_files, name):
    folder, _ = tiny_files[name]
    backend = load_backend(folder, device="cpu")
    info = backend.info
    assert info.family == FAMILY[name]
    assert info.prediction_type == ("v_prediction" if name == "tiny-sd2" else "epsilon")
    assert info.widths == {"tiny-sd1": (32,), "tiny-sd2": (48,), "tiny-sdxl": (32, 64)}[name]
    tokenizer = backend.tokenizers[0]
    assert info.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert info.pad_token_id == (info.eos_token_id if name == "tiny-sd1" else 0)  # SD2 pads with "!" = id 0
    if name == "tiny-sdxl":
        assert backend.tokenizers[1].pad_token_id == 0


def test_prediction_type_override(tiny_files):
    folder, path = tiny_files["tiny-sd2"]
    backend = load_backend(path, config=folder, tokenizer=folder / "tokenizer", device="cpu", prediction_type="epsilon")
    assert backend.info.prediction_type == "epsilon"


def _shapes(name):
    return {k: tuple(v.shape) for k, v in pipeline_to_ldm(build_tiny_pipeline(name), FAMILY[name]).items()}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_detect_family_from_key_layout(name):
    assert detect_family(_shapes(name)) == FAMILY[name]


def test_detect_family_rejects_other_files():
    with pytest.raises(ConceptExpressError, match="not a LoRA, VAE"):
        detect_family({"lora_unet_down_blocks_0.alpha": ()})
    shapes = _shapes("tiny-sdxl")
    refiner = {
        k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
        for k, v in shapes.items()
        if not k.startswith("conditioner.embedders.0.")
    }
    with pytest.raises(ConceptExpressError, match="refiner"):
        detect_family(refiner)
    inpaint = dict(_shapes("tiny-sd1"))
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = (16, 9, 3, 3)
    with pytest.raises(ConceptExpressError, match="inpainting"):
        detect_family(inpaint)
    unet_only = {k: v for k, v in _shapes("tiny-sd1").items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(ConceptExpressError, match="no text encoder"):
        detect_family(unet_only)


def test_corrupt_and_foreign_files_get_clear_errors(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConceptExpressError, match="broken.safetensors: the file is damaged"):
        load_backend(bad, device="cpu")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ConceptExpressError, match="no UNet inside"):
        load_backend(lora, device="cpu")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ConceptExpressError, match="expected a .safetensors or .ckpt"):
        load_backend(text, device="cpu")
    with pytest.raises(ConceptExpressError, match="no such file or folder"):
        load_backend(tmp_path / "missing.safetensors", device="cpu")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConceptExpressError, match="model_index.json"):
        load_backend(tmp_path / "folder", device="cpu")


class _Payload:
    """Unpickling this creates a file: proof that loading executed code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_ckpt_with_python_objects_is_refused_not_executed(tmp_path):
    path, marker = tmp_path / "evil.ckpt", tmp_path / "executed"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Payload(marker)}}, f)
    with pytest.raises(ConceptExpressError, match="unsafe to load"):
        load_backend(path, device="cpu")
    assert not marker.exists()


def test_ckpt_of_plain_tensors_loads(tiny_files, tmp_path):
    folder, _ = tiny_files["tiny-sd1"]
    state = pipeline_to_ldm(build_tiny_pipeline("tiny-sd1"), "sd1")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, path)
    backend = load_backend(path, config=folder, tokenizer=folder / "tokenizer", device="cpu")
    assert backend.info.family == "sd1"
    assert torch.equal(backend.pipe.unet.conv_in.weight, build_tiny_pipeline("tiny-sd1").unet.conv_in.weight)


def test_missing_tokenizer_error_says_where_to_get_one(tmp_path, monkeypatch):
    for var in ("CONCEPT_EXPRESS_TOKENIZER", "COMFYUI_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ConceptExpressError, match="--tokenizer"):
        find_tokenizer()
    with pytest.raises(ConceptExpressError, match="vocab.json"):
        find_tokenizer(tmp_path)


def test_tokenizer_found_in_a_comfyui_tree(tmp_path, monkeypatch):
    tok = tmp_path / "ComfyUI" / "comfy" / "sd1_tokenizer"
    tok.mkdir(parents=True)
    (tok / "vocab.json").write_text("{}")
    (tok / "merges.txt").write_text("")
    monkeypatch.delenv("CONCEPT_EXPRESS_TOKENIZER", raising=False)
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "ComfyUI"))
    assert find_tokenizer() == tok


def test_shipped_configs_describe_the_real_architectures():
    """The configs used for single files build models with the published parameter counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def millions(module):
        return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)

    expected = {
        "sd1": (859.52, 123.06),
        "sd2-base": (865.91, 340.39),
        "sd2-v": (865.91, 340.39),
        "sdxl": (2567.46, 123.06),
    }
    with torch.device("meta"):
        for name, (unet_m, text_m) in expected.items():
            cfg = lambda part: json.loads((CONFIG_DIR / name / part / "config.json").read_text())  # noqa: E731
            assert millions(UNet2DConditionModel.from_config(cfg("unet"))) == unet_m
            assert millions(AutoencoderKL.from_config(cfg("vae"))) == 83.65
            assert millions(CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))) == text_m
        g = CLIPTextModelWithProjection(
            CLIPTextConfig(**json.loads((CONFIG_DIR / "sdxl/text_encoder_2/config.json").read_text()))
        )
        assert millions(g) == 694.66
    sched = lambda name: json.loads((CONFIG_DIR / name / "scheduler/scheduler_config.json").read_text())  # noqa: E731
    assert sched("sd2-v")["prediction_type"] == "v_prediction" and sched("sd2-base")["prediction_type"] == "epsilon"
