"""Exported embeddings load back bit-exact through diffusers (and ComfyUI when a tree is available); export is
atomic, never overwrites silently, and names cannot escape the folder. Generation with learned tokens."""

import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from concept_express.uce_core.backends.base import Prompt, Slot
from concept_express.uce_core.backends.tiny import build_tiny_pipeline
from concept_express.uce_core.errors import ConceptExpressError
from concept_express.uce_core.export import MANIFEST, export_tokens, load_exported, sanitize_name
from concept_express.uce_core.generate import generate_images, parse_template
from concept_express.uce_core.tokens import ConceptTokens
from concept_express.uce_core.train import TrainSettings, train_concept_tokens


def _tokens(concepts_for, name="tiny-sd1", count=2):
    backend, concepts = concepts_for(name, count)
    return backend, train_concept_tokens(backend, concepts, TrainSettings(steps=2, merge_step=1, split_tokens=2))


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_diffusers_load_textual_inversion_is_bit_exact(concepts_for, tmp_path, name):
    _, tokens = _tokens(concepts_for, name)
    result = export_tokens(tokens, tmp_path)
    pipe = build_tiny_pipeline(name)
    for i, path in enumerate(result.embeddings):
        assert set(load_file(str(path))) == {"emb_params"}
        token = f"<{result.names[i]}>"
        pipe.load_textual_inversion(str(path), token=token)
        row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(token)]
        assert torch.equal(row.detach(), tokens.vectors[0][i])


def test_sdxl_files_carry_both_encoders_and_load_into_diffusers(concepts_for, tmp_path):
    _, tokens = _tokens(concepts_for, "tiny-sdxl")
    result = export_tokens(tokens, tmp_path)
    pipe = build_tiny_pipeline("tiny-sdxl")
    for i, path in enumerate(result.embeddings):
        state = load_file(str(path))
        assert (
            set(state) == {"clip_l", "clip_g"} and state["clip_l"].shape == (1, 32) and state["clip_g"].shape == (1, 64)
        )
        token = f"<{result.names[i]}>"
        pipe.load_textual_inversion(
            state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        for e, (encoder, tokenizer) in enumerate(
            [(pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)]
        ):
            row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)]
            assert torch.equal(row.detach(), tokens.vectors[e][i])


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="needs a ComfyUI tree in COMFYUI_PATH")
@pytest.mark.comfyui
@pytest.mark.parametrize("name,embedding_key,width", [("tiny-sd1", "clip_l", 32), ("tiny-sdxl", "clip_g", 64)])
def test_comfyui_embedding_loader_reads_the_files(concepts_for, tmp_path, name, embedding_key, width):
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = True
    import comfy.sd1_clip as sd1_clip

    _, tokens = _tokens(concepts_for, name)
    result = export_tokens(tokens, tmp_path / "embeddings" / "set", prefix="cat")
    for i, n in enumerate(result.names):
        emb = sd1_clip.load_embed(f"set/{n}", [str(tmp_path / "embeddings")], width, embedding_key)
        encoder = tokens.encoder_keys.index(embedding_key)
        assert emb is not None and torch.equal(emb.reshape(-1), tokens.vectors[encoder][i])


def test_round_trip_through_the_export_folder(concepts_for, tmp_path):
    _, tokens = _tokens(concepts_for, "tiny-sdxl", 3)
    result = export_tokens(tokens, tmp_path, prefix="stilllife")
    assert result.names == ["stilllife_1", "stilllife_2", "stilllife_3"]
    back = load_exported(tmp_path)
    assert back.names == result.names and back.family == "sdxl" and back.encoder_keys == tokens.encoder_keys
    for a, b in zip(back.vectors, tokens.vectors):
        assert torch.equal(a, b)
    assert torch.equal(back.masks, tokens.masks) and torch.equal(back.image, tokens.image)
    for extra in ("concepts.png", "loss.png", MANIFEST, "stilllife_1_mask.png", "image.png"):
        assert (tmp_path / extra).stat().st_size > 0
    # ComfyUI lists every file with an embedding extension as an embedding: only the concepts may have one
    embedding_like = [
        p.name
        for p in tmp_path.iterdir()
        if p.suffix in (".safetensors", ".pt", ".bin", ".ckpt", ".pth", ".pt2", ".pkl", ".sft")
    ]
    assert sorted(embedding_like) == [f"{n}.safetensors" for n in result.names]


def test_existing_files_are_never_replaced_unless_asked(concepts_for, tmp_path):
    _, tokens = _tokens(concepts_for, "tiny-sd1")
    export_tokens(tokens, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    changed = ConceptTokens(
        [v + 1 for v in tokens.vectors],
        tokens.encoder_keys,
        tokens.family,
        tokens.names,
        tokens.masks,
        tokens.image,
        tokens.history,
        tokens.info,
    )
    with pytest.raises(ConceptExpressError, match="already exist.*nothing was written"):
        export_tokens(changed, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    export_tokens(changed, tmp_path, overwrite=True)
    assert torch.equal(load_file(str(tmp_path / "concept_1.safetensors"))["emb_params"][0], tokens.vectors[0][0] + 1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_replacing_a_set_with_a_smaller_one_leaves_no_stale_concepts(concepts_for, tmp_path):
    _, three = _tokens(concepts_for, "tiny-sd1", 3)
    export_tokens(three, tmp_path, prefix="scene")
    keep = tmp_path / "notes.safetensors"  # a user's own file, not listed by the manifest: never touched
    keep.write_bytes(b"mine")
    two = ConceptTokens(
        [v[:2] for v in three.vectors],
        three.encoder_keys,
        three.family,
        three.names[:2],
        three.masks[:2],
        three.image,
        three.history,
        three.info,
    )
    export_tokens(two, tmp_path, prefix="scene", overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("scene_*")) == [
        "scene_1.safetensors",
        "scene_1_mask.png",
        "scene_2.safetensors",
        "scene_2_mask.png",
    ]
    assert keep.read_bytes() == b"mine"
    assert load_exported(tmp_path).names == ["scene_1", "scene_2"]


def test_replacing_never_deletes_what_an_edited_manifest_names_beyond_concept_files(concepts_for, tmp_path):
    import json

    _, tokens = _tokens(concepts_for, "tiny-sd1")
    export_tokens(tokens, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["concepts"][0]["file"] = "../outside.safetensors"  # names never leave the folder
    manifest["concepts"][1]["mask"] = "notes.txt"
    manifest["record"] = "loss.png"
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path.parent / "outside.safetensors").write_bytes(b"theirs")
    (tmp_path / "notes.txt").write_text("mine")
    export_tokens(tokens, tmp_path, overwrite=True)
    assert (tmp_path.parent / "outside.safetensors").read_bytes() == b"theirs"
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert {"loss.png", "concepts.png", "image.png", MANIFEST} <= {p.name for p in tmp_path.iterdir()}
    assert load_exported(tmp_path).names == ["concept_1", "concept_2"]


def test_a_set_from_an_earlier_version_is_a_clear_error_and_replacing_it_removes_its_record(concepts_for, tmp_path):
    import json

    _, tokens = _tokens(concepts_for, "tiny-sd1")
    export_tokens(tokens, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest.update(format="concept-express/manifest/1", record="concept-tokens.safetensors")
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "concept-tokens.safetensors").write_bytes(b"the old record")
    with pytest.raises(ConceptExpressError, match="earlier version of concept-express"):
        load_exported(tmp_path)
    export_tokens(tokens, tmp_path, overwrite=True)
    assert not (tmp_path / "concept-tokens.safetensors").exists()  # ComfyUI would list it as an embedding
    assert load_exported(tmp_path).names == ["concept_1", "concept_2"]


def test_a_prefix_only_needs_to_make_valid_file_names(concepts_for, tmp_path):
    _, tokens = _tokens(concepts_for, "tiny-sd1")
    assert export_tokens(tokens, tmp_path, prefix="con").names == ["con_1", "con_2"]  # con_1 is a legal file name


def test_an_edited_set_is_one_clear_error(concepts_for, tmp_path):
    from safetensors.torch import save_file

    _, tokens = _tokens(concepts_for, "tiny-sd1")
    export_tokens(tokens, tmp_path)
    original = (tmp_path / "concept_2.safetensors").read_bytes()
    save_file({"something": torch.zeros(1, 32)}, str(tmp_path / "concept_2.safetensors"))
    with pytest.raises(ConceptExpressError, match=r"concept_2.safetensors: holds \['something'\]"):
        load_exported(tmp_path)
    save_file({"emb_params": torch.zeros(1, 48)}, str(tmp_path / "concept_2.safetensors"))
    with pytest.raises(ConceptExpressError, match="48-wide emb_params vector where the set's others are 32 wide"):
        load_exported(tmp_path)
    (tmp_path / "concept_2.safetensors").write_bytes(original)
    manifest = (tmp_path / MANIFEST).read_text()
    (tmp_path / MANIFEST).write_text(manifest.replace('"encoders"', '"encoder_list"'))
    with pytest.raises(ConceptExpressError, match="incomplete or was edited"):
        load_exported(tmp_path)
    (tmp_path / MANIFEST).write_text("[1, 2]")
    with pytest.raises(ConceptExpressError, match="not a ConceptExpress manifest"):
        load_exported(tmp_path)


def test_names_cannot_escape_the_folder(concepts_for, tmp_path):
    _, tokens = _tokens(concepts_for, "tiny-sd1")
    evil = ConceptTokens(
        tokens.vectors, tokens.encoder_keys, tokens.family, ["../../escape", "/etc/passwd"], tokens.masks, tokens.image
    )
    result = export_tokens(evil, tmp_path / "out")
    for path in result.embeddings:
        assert path.resolve().parent == (tmp_path / "out").resolve()
    assert not (tmp_path / "escape.safetensors").exists()
    assert sanitize_name("../a b/c") == "a_b_c"
    for bad in ("..", "///", "con", "NUL.txt", ""):
        with pytest.raises(ConceptExpressError):
            sanitize_name(bad)


def test_parse_template():
    assert parse_template("a photo of {1} on the beach", 2) == Prompt(("a photo of ", Slot(0), " on the beach"))
    assert parse_template("{all} in the snow", 3) == Prompt(
        (Slot(0), " and ", Slot(1), " and ", Slot(2), " in the snow")
    )
    with pytest.raises(ConceptExpressError, match="only 2 concepts"):
        parse_template("{3}", 2)
    with pytest.raises(ConceptExpressError, match="no concept"):
        parse_template("a photo", 2)


def test_generation_is_seeded_and_checks_the_model_family(concepts_for):
    backend, tokens = _tokens(concepts_for, "tiny-sd1")
    a = generate_images(backend, tokens, "a photo of {1}", seed=3, steps=4)
    b = generate_images(backend, tokens, "a photo of {1}", seed=3, steps=4)
    c = generate_images(backend, tokens, "a photo of {2}", seed=3, steps=4, count=2)
    assert a[0].size == (tokens.image.shape[1], tokens.image.shape[0]) and len(c) == 2
    assert a[0].tobytes() == b[0].tobytes() and a[0].tobytes() != c[0].tobytes()
    other, _ = concepts_for("tiny-sdxl", 1)
    with pytest.raises(ConceptExpressError, match="learned on a sd1 model"):
        generate_images(other, tokens, "{1}", steps=2)


def test_mask_pictures_are_the_masks_at_the_images_size_in_its_orientation(concepts_for, tmp_path):
    """The example image is 3:2 (a 16 x 24 grid): each <name>_mask.png is that concept's mask, every cell an 8 x 8
    block, white inside, as wide as the image."""
    from PIL import Image

    _, tokens = _tokens(concepts_for, "tiny-sd1", 2)
    h, w = tokens.masks.shape[1:]
    assert h != w
    result = export_tokens(tokens, tmp_path)
    for name, mask in zip(result.names, tokens.masks):
        picture = np.asarray(Image.open(tmp_path / f"{name}_mask.png"))
        expected = mask.numpy().repeat(8, 0).repeat(8, 1).astype(np.uint8) * 255
        assert picture.shape == expected.shape == tuple(tokens.image.shape[:2])
        np.testing.assert_array_equal(picture, expected)
