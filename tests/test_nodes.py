"""The node pack without ComfyUI: declarations are valid ComfyUI (V1) declarations, and the node functions that need
no ComfyUI type run on the diffusers backend."""

import inspect

import numpy as np
import pytest
import torch

import concept_express
from concept_express.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from concept_express.nodes.compose import ComposeConceptPrompt, compose_text
from concept_express.uce_core.errors import ConceptExpressError

COMFY_TYPES = {
    "MODEL",
    "CLIP",
    "VAE",
    "IMAGE",
    "MASK",
    "STRING",
    "INT",
    "FLOAT",
    "BOOLEAN",
    "CONDITIONING",
    "UCE_ATTENTION",
    "UCE_CONCEPTS",
    "UCE_TOKENS",
}
EXPECTED = {
    "CaptureAttention",
    "LocalizeConcepts",
    "EditConcepts",
    "TrainConceptTokens",
    "ComposeConceptPrompt",
    "LoadConceptTokens",
    "ConceptContactSheet",
}


def test_the_pack_exports_the_nodes():
    assert set(concept_express.NODE_CLASS_MAPPINGS) == EXPECTED
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_declarations_are_valid(name):
    cls = NODE_CLASS_MAPPINGS[name]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and "required" in spec
    assert cls.CATEGORY == "ConceptExpress"
    function = getattr(cls, cls.FUNCTION)
    parameters = inspect.signature(function).parameters
    for section in ("required", "optional"):
        for input_name, declaration in spec.get(section, {}).items():
            assert isinstance(declaration, tuple) and 1 <= len(declaration) <= 2, input_name
            kind = declaration[0]
            assert isinstance(kind, list) or kind in COMFY_TYPES, (input_name, kind)
            options = declaration[1] if len(declaration) == 2 else {}
            assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
            if isinstance(kind, list):
                assert options.get("default", kind[0]) in kind
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], input_name
            assert input_name in parameters, f"{name}.{cls.FUNCTION} does not take {input_name}"
            if section == "optional":
                assert parameters[input_name].default is not inspect.Parameter.empty
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    assert all(t in COMFY_TYPES for t in cls.RETURN_TYPES)
    assert cls.DESCRIPTION


def test_compose_text_writes_comfyui_embedding_syntax():
    names = ["cat/cat_1", "cat/cat_2"]
    assert (
        compose_text("a photo of {1} and {2} in the snow", names)
        == "a photo of embedding:cat/cat_1 and embedding:cat/cat_2 in the snow"
    )
    assert compose_text("{all}, oil painting", names) == "embedding:cat/cat_1 and embedding:cat/cat_2, oil painting"
    # ComfyUI only recognises "embedding:" at the start or after whitespace or a bracket: spaces are added
    assert compose_text("photo,{1}", names) == "photo, embedding:cat/cat_1"
    assert compose_text("({1}:1.2)", names) == "(embedding:cat/cat_1:1.2)"
    with pytest.raises(ConceptExpressError, match="only 2 concepts"):
        compose_text("{3}", names)
    with pytest.raises(ConceptExpressError, match="no concept"):
        compose_text("a photo", names)
    with pytest.raises(ConceptExpressError, match="no concept names"):
        compose_text("{1}", [])


def test_compose_node_takes_names_from_tokens_or_text():
    node = ComposeConceptPrompt()
    (text,), (conditioning,), _ = node.compose("a photo of {2}", embedding_names="a/a_1\na/a_2")
    assert text == "a photo of embedding:a/a_2" and conditioning is None

    class Tokens:
        names = ["x_1"]
        info = {"embedding_names": ["x/x_1"]}

    assert node.compose("{1}", tokens=Tokens())[0] == ["embedding:x/x_1"]


def test_a_damaged_or_older_saved_manifest_never_counts_as_the_same_run(tmp_path):
    from concept_express.nodes.train import _saved_fingerprint

    manifest = tmp_path / "manifest.json"
    assert _saved_fingerprint(tmp_path) is None  # no set saved yet
    manifest.write_text('{"format": "concept-express/manifest/2", "info": {"fingerprint": "abc"}}')
    assert _saved_fingerprint(tmp_path) == "abc"
    for damaged in (
        '{"format": "concept-express/manifest/2", "info": {"fingerp',
        "[1, 2]",
        '{"format": "concept-express/manifest/2", "info": 3}',
        '{"info": {"fingerprint": "abc"}}',
        '{"format": "concept-express/manifest/1", "info": {"fingerprint": "abc"}}',
    ):  # older: not reusable
        manifest.write_text(damaged)
        assert _saved_fingerprint(tmp_path) is None


def test_localize_node_takes_masks_and_a_label_image_as_concepts():
    from test_concept_edits import cells, make_maps, oracle_f, pixel_mask

    from concept_express.nodes.localize import LocalizeConcepts

    maps = make_maps()
    mask = pixel_mask((32, 48), (0, 12, 8, 27))[None]  # a ComfyUI MASK batch of one
    concepts, masks, overlay = LocalizeConcepts().localize(maps, masks=mask)
    expected = cells((0, 1), (0, 2), (1, 1), (1, 2))
    assert len(concepts) == 1 and (concepts.masks[0].numpy() == expected).all()
    np.testing.assert_allclose(concepts.features[0].numpy(), oracle_f(maps, expected), rtol=1e-6, atol=1e-9)
    assert masks.shape == (1, 32, 48) and overlay.shape == (1, 32, 48, 3)
    label = torch.zeros(1, 32, 48, 3)
    label[0, 0:8, 0:8] = torch.tensor([1.0, 0.0, 0.0])
    label[0, 24:32, 40:48] = torch.tensor([0.0, 0.0, 1.0])
    concepts, masks, _ = LocalizeConcepts().localize(maps, masks=mask, label_image=label)
    assert len(concepts) == 3 and masks.shape == (3, 32, 48)
    assert (concepts.masks[1].numpy() == cells((0, 0))).all() and (concepts.masks[2].numpy() == cells((3, 5))).all()


def test_localize_node_adds_a_mask_to_what_localization_finds():
    from test_localize import scene

    from concept_express.nodes.localize import LocalizeConcepts

    maps, rows, _ = scene(6)
    found, _, _ = LocalizeConcepts().localize(maps)
    assert len(found) >= 2
    # a mask (at the image's 128 x 128 pixels) that is found concept 1 plus one cell: it takes concept 1's place
    grid_mask = found.masks[0].clone()
    outside = torch.nonzero(~found.masks.any(0))[0]
    grid_mask[outside[0], outside[1]] = True
    pixels = grid_mask.float().repeat_interleave(8, 0).repeat_interleave(8, 1)[None]
    out, masks, _ = LocalizeConcepts().localize(maps, masks=pixels, mode="masks + found")
    assert len(out) == len(found) and torch.equal(out.masks[0], grid_mask)
    assert torch.equal(out.masks[1:], found.masks[1:]) and torch.equal(out.features[1:], found.features[1:])
    expected = rows.astype(np.float64)[grid_mask.numpy().ravel()].mean(0)
    np.testing.assert_allclose(out.features[0].numpy(), expected, rtol=1e-5, atol=1e-9)
    # "masks only": just the mask
    only, _, _ = LocalizeConcepts().localize(maps, masks=pixels)
    assert len(only) == 1 and torch.equal(only.masks[0], grid_mask)


def test_localize_node_refuses_an_empty_mask_from_load_image():
    from test_concept_edits import make_maps

    from concept_express.nodes.localize import LocalizeConcepts

    # Load Image of a picture without alpha outputs a 64 x 64 empty mask
    with pytest.raises(ConceptExpressError, match="mask 1 of 1 is empty.*mask editor"):
        LocalizeConcepts().localize(make_maps(), masks=torch.zeros(1, 64, 64))


def test_edit_node_passes_through_by_default_and_outputs_the_new_overlay():
    from test_concept_edits import edit_fixture

    from concept_express.nodes.edit import EditConcepts

    _, concepts = edit_fixture()
    same, masks, overlay = EditConcepts().edit(concepts)
    assert same is concepts and masks.shape == (4, 32, 48) and overlay.shape == (1, 32, 48, 3)
    kept, masks, overlay = EditConcepts().edit(concepts, keep="1,3", names="dog")
    assert len(kept) == 2 and masks.shape == (2, 32, 48) and kept.info["names"] == ["dog", None]
    assert torch.equal(kept.masks, concepts.masks[[0, 2]])
    with pytest.raises(ConceptExpressError, match="no concept 7"):
        EditConcepts().edit(concepts, drop="7")
