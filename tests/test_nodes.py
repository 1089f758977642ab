"""The node pack without ComfyUI: declarations are valid ComfyUI (V1) declarations, and the node functions that need
no ComfyUI type run on the diffusers backend."""

import inspect

import pytest

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
