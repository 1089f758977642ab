"""Compose Concept Prompt's list modes and the Concept Contact Sheet, without ComfyUI: what the per-concept
sampling branch of the extract template gets, and the sheet it ends in (checked pixel by pixel against the layout
rule: tile k at column k % columns, row k // columns; the badge in the concept's overlay colour)."""

import numpy as np
import pytest
import torch
from PIL import Image

from concept_express.nodes.compose import EACH_AND_ALL, EACH_CONCEPT, SINGLE, ComposeConceptPrompt, compose_prompts
from concept_express.nodes.sheet import ConceptContactSheet, sheet_tiles
from concept_express.uce_core.errors import ConceptExpressError
from concept_express.uce_core.previews import PALETTE, contact_sheet

NAMES = ["c/c_1", "c/c_2", "c/c_3"]


def test_each_concept_mode_gives_one_prompt_per_concept_then_all():
    assert compose_prompts("a photo of {each} on a beach", NAMES, EACH_AND_ALL) == [
        ("1", "a photo of embedding:c/c_1 on a beach"),
        ("2", "a photo of embedding:c/c_2 on a beach"),
        ("3", "a photo of embedding:c/c_3 on a beach"),
        ("all", "a photo of embedding:c/c_1 and embedding:c/c_2 and embedding:c/c_3 on a beach"),
    ]
    assert [label for label, _ in compose_prompts("{each}", NAMES[:1], EACH_CONCEPT)] == ["1"]
    # other placeholders keep their meaning beside {each}
    assert compose_prompts("{each} next to {1}", NAMES[:2], EACH_CONCEPT)[1] == (
        "2",
        "embedding:c/c_2 next to embedding:c/c_1",
    )


def test_single_mode_is_one_prompt_labelled_with_what_it_uses():
    assert compose_prompts("a photo of {2} and {1}", NAMES) == [
        ("2 + 1", "a photo of embedding:c/c_2 and embedding:c/c_1")
    ]
    assert compose_prompts("{all}, oil painting", NAMES, SINGLE)[0][0] == "all"


@pytest.mark.parametrize(
    "template, names, mode, phrase",
    [
        ("a photo of {1}", NAMES, EACH_CONCEPT, "write {each}"),
        ("a photo of {each}", NAMES, SINGLE, "set mode to 'each concept'"),
        ("a photo of {each}", [], EACH_AND_ALL, "no concept names"),
        ("a photo of {each} and {4}", NAMES, EACH_CONCEPT, "only 3 concepts"),
        ("a photo of {each}", NAMES, "every", "unknown mode"),
    ],
)
def test_list_mode_mistakes_are_one_clear_error(template, names, mode, phrase):
    with pytest.raises(ConceptExpressError, match=phrase.replace("{", r"\{").replace("(", r"\(")):
        compose_prompts(template, names, mode)


def test_compose_node_outputs_lists_so_downstream_nodes_run_once_per_prompt():
    assert ComposeConceptPrompt.OUTPUT_IS_LIST == (True, True, True)
    node = ComposeConceptPrompt()
    texts, conditionings, labels = node.compose(
        "a photo of {each}", embedding_names="\n".join(NAMES), mode=EACH_AND_ALL
    )
    assert len(texts) == len(conditionings) == len(labels) == 4 and conditionings == [None] * 4
    assert labels == ["1", "2", "3", "all"]
    # the default mode keeps what saved workflows had: one prompt
    assert node.compose("a photo of {2}", embedding_names="a/a_1\na/a_2") == (
        ["a photo of embedding:a/a_2"],
        [None],
        ["2"],
    )

    class Clip:  # records what would be encoded
        def __init__(self):
            self.texts = []

        def tokenize(self, text):
            self.texts.append(text)
            return text

        def encode_from_tokens_scheduled(self, tokens):
            return [[tokens, {}]]

    clip = Clip()
    texts, conditionings, _ = node.compose("{each}", embedding_names="x/x_1\nx/x_2", clip=clip, mode=EACH_CONCEPT)
    assert clip.texts == texts == ["embedding:x/x_1", "embedding:x/x_2"]
    assert [c[0][0] for c in conditionings] == texts


def _solid(colour, size=(40, 30)):
    return Image.new("RGB", size, colour)


def test_contact_sheet_layout_and_badges():
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)]
    renders = [_solid(c, (64, 64)) for c in colours]
    labels = ["1", "2", "3", "4", "all"]
    tile, columns = 128, 4
    sheet = np.asarray(contact_sheet(renders, labels, overlay=None, tile=tile, columns=columns)).astype(int)
    gap = max(4, tile // 32)  # the sheet's spacing rule
    assert sheet.shape == (2 * tile + gap + 2 * gap, columns * tile + 3 * gap + 2 * gap, 3)
    for k, colour in enumerate(colours):
        x0, y0 = gap + (k % columns) * (tile + gap), gap + (k // columns) * (tile + gap)
        # the bottom-right quarter of the tile is the render (scaled up to the tile), untouched by the badge
        block = sheet[y0 + tile // 2 : y0 + tile - 2, x0 + tile // 2 : x0 + tile - 2]
        assert np.abs(block - colour).max() <= 2, (k, colour)
        # the badge at the top-left corner has the concept's overlay colour (grey for "all")
        corner = sheet[y0 + gap : y0 + gap + tile // 6, x0 + gap : x0 + gap + tile // 6].reshape(-1, 3)
        expected = PALETTE[k] if labels[k].isdigit() else (90, 90, 90)
        assert (np.abs(corner - expected).max(axis=1) == 0).mean() > 0.3, (k, labels[k])


def test_contact_sheet_puts_the_overlay_beside_the_renders():
    overlay = _solid((200, 100, 50), (160, 120))
    sheet = contact_sheet([_solid((0, 0, 250))], ["1"], overlay=overlay, tile=120)
    array = np.asarray(sheet).astype(int)
    gap = max(4, 120 // 32)
    # overlay scaled to the grid's height (120 px): 160 x 120, at the left
    assert np.abs(array[gap + 10 : gap + 110, gap + 10 : gap + 150] - (200, 100, 50)).max() <= 2
    assert sheet.width == gap + 160 + 2 * gap + 120 + gap  # margin, overlay, double gap, render, margin
    with pytest.raises(ValueError, match="2 labels for 1 renders"):
        contact_sheet([overlay], ["1", "2"])


def test_sheet_node_takes_lists_and_flattens_batches():
    assert ConceptContactSheet.INPUT_IS_LIST is True
    images = [torch.zeros(1, 16, 16, 3), torch.ones(2, 16, 16, 3)]
    tiles, names = sheet_tiles(images, ["1", "all"])
    assert names == ["1", "all.1", "all.2"] and len(tiles) == 3
    assert sheet_tiles(images, None)[1] == ["1", "2.1", "2.2"]
    with pytest.raises(ConceptExpressError, match="3 labels for 2 renders"):
        sheet_tiles(images, ["1", "2", "3"])
    (result,) = ConceptContactSheet().sheet(images, labels=["1", "all"], overlay=[torch.rand(1, 30, 40, 3)], tile=[64])
    assert result.ndim == 4 and result.shape[0] == 1 and result.shape[-1] == 3
    assert float(result.min()) >= 0.0 and float(result.max()) <= 1.0
