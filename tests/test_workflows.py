"""The shipped ComfyUI workflows, without ComfyUI: valid UI-format JSON whose node types, widget values and links
match our node declarations and the stock ComfyUI nodes listed in comfy_workflows.STOCK_NODES, and that run as
shipped for any number of concepts."""

import re
import struct

import comfy_workflows as cw
import pytest

from concept_express.nodes import NODE_CLASS_MAPPINGS
from concept_express.nodes.compose import compose_prompts

DECLARATIONS = {**cw.STOCK_NODES, **cw.our_declarations()}
TOP_LEVEL = {"id", "revision", "last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"}


@pytest.fixture(params=cw.WORKFLOW_NAMES)
def workflow(request):
    return request.param, cw.load(request.param)


def test_only_the_three_workflows_and_their_thumbnails_are_shipped():
    files = sorted(p.name for p in cw.WORKFLOWS.iterdir())
    assert files == sorted([f"{n}.json" for n in cw.WORKFLOW_NAMES] + [f"{n}.jpg" for n in cw.WORKFLOW_NAMES])


@pytest.mark.parametrize("name", cw.WORKFLOW_NAMES)
def test_thumbnail_is_a_small_jpeg(name):
    data = (cw.WORKFLOWS / f"{name}.jpg").read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9", "not a JPEG"
    assert len(data) < 200_000
    # frame header: a real picture, landscape like the Templates dialog's cards
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            break
        i += 2 + length
    assert 300 <= width <= 2000 and 200 <= height <= width


def test_ui_format_structure(workflow):
    name, wf = workflow
    assert set(wf) == TOP_LEVEL
    assert isinstance(wf["version"], (int, float)) and wf["version"] >= 0.4
    assert re.fullmatch(r"[0-9a-f-]{36}", wf["id"])
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and wf["last_node_id"] >= max(ids)
    link_ids = [link[0] for link in wf["links"]]
    assert len(link_ids) == len(set(link_ids)) and wf["last_link_id"] >= max(link_ids)
    for node in wf["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "properties"} <= set(node), node["id"]
        assert node["mode"] in (cw.MODE_ALWAYS, cw.MODE_NEVER), "only enabled and muted nodes (no bypass)"
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
    for group in wf["groups"]:
        assert group["title"] and len(group["bounding"]) == 4


def test_every_node_is_ours_or_a_listed_stock_node(workflow):
    name, wf = workflow
    types = {n["type"] for n in wf["nodes"]}
    unknown = types - set(NODE_CLASS_MAPPINGS) - set(cw.STOCK_NODES) - cw.FRONTEND_ONLY
    assert not unknown
    assert types & set(NODE_CLASS_MAPPINGS), "the workflow uses none of our nodes"
    # no stock node listed for nothing (the list is what the real-ComfyUI tests check against the server)
    used_stock = {t for w in cw.WORKFLOW_NAMES for t in (n["type"] for n in cw.load(w)["nodes"])} & set(cw.STOCK_NODES)
    assert used_stock == set(cw.STOCK_NODES)


def test_widget_values_match_the_declarations(workflow):
    name, wf = workflow
    for node in wf["nodes"]:
        if node["type"] in cw.FRONTEND_ONLY:
            assert isinstance(node["widgets_values"][0], str) and node["widgets_values"][0].strip()
            continue
        where = f"{name}: node {node['id']} ({node['type']})"
        slots = cw.widget_slots(DECLARATIONS[node["type"]])
        values = node.get("widgets_values") or []
        assert len(values) == len(slots), f"{where}: {len(values)} widget values for {[s.input for s in slots]}"
        for slot, value in zip(slots, values):
            if slot.kind == "control_after_generate":
                assert value in cw.CONTROL_VALUES, f"{where}: {slot.input} control {value!r}"
            elif slot.kind == "upload":
                assert value == "image", where
            else:
                problem = cw.check_value(slot.spec, value)
                assert problem is None, f"{where}: {slot.input}: {problem}"


def test_seed_widgets_have_the_control_widget_exactly_where_the_frontend_adds_one(workflow):
    """Known layouts, not the converter's rule: a KSampler's values are [seed, control, steps, cfg, sampler,
    scheduler, denoise] (the frontend adds the control after an INT named seed), while TrainConceptTokens declares
    control_after_generate: false, so its seed is followed directly by the next input's value."""
    name, wf = workflow
    seen = set()
    for node in wf["nodes"]:
        values = node.get("widgets_values")
        if node["type"] == "KSampler":
            assert len(values) == 7 and isinstance(values[0], int) and values[1] in cw.CONTROL_VALUES, (name, values)
            assert isinstance(values[2], int) and values[4] not in cw.CONTROL_VALUES, (name, values)
        elif node["type"] == "TrainConceptTokens":
            widgets = [
                input_name for input_name, spec in cw.declared_inputs(DECLARATIONS[node["type"]]) if cw.is_widget(spec)
            ]
            assert len(values) == len(widgets), (name, values)
            after_seed = values[widgets.index("seed") + 1]
            assert after_seed not in cw.CONTROL_VALUES and after_seed == values[widgets.index("overwrite")], values
        else:
            continue
        seen.add(node["type"])
    assert "KSampler" in seen  # both workflows generate; the extract workflow also trains
    assert name != cw.EXTRACT or "TrainConceptTokens" in seen


def test_training_seed_cannot_be_randomised_so_requeueing_reuses_the_tokens():
    """With "randomize" the frontend would change the seed after every queue, so every run would train again (and
    then refuse to overwrite the first run's embeddings). The node declares no control widget for its seed."""
    seed = DECLARATIONS["TrainConceptTokens"]["input"]["required"]["seed"]
    assert seed[1]["control_after_generate"] is False
    slots = cw.widget_slots(DECLARATIONS["TrainConceptTokens"])
    assert [s.kind for s in slots].count("control_after_generate") == 0
    (train,) = [n for n in cw.load(cw.EXTRACT)["nodes"] if n["type"] == "TrainConceptTokens"]
    assert len(train["widgets_values"]) == len(slots)


def test_our_nodes_ship_with_their_documented_defaults():
    """Shipped settings are the node defaults (the paper's), except where the workflow says otherwise."""
    deliberate = {(cw.MASKS, "EditConcepts", "names")}  # the painted concept gets a name: the note says so
    for name in cw.WORKFLOW_NAMES:
        for node in cw.load(name)["nodes"]:
            if node["type"] not in NODE_CLASS_MAPPINGS or node["type"] in ("ComposeConceptPrompt", "LoadConceptTokens"):
                continue
            for slot, value in zip(cw.widget_slots(DECLARATIONS[node["type"]]), node["widgets_values"]):
                if slot.kind == "value" and (name, node["type"], slot.input) not in deliberate:
                    assert value == slot.spec[1]["default"], (name, node["type"], slot.input)


def test_links_are_consistent_and_type_correct(workflow):
    name, wf = workflow
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, source, slot, target, target_slot, kind in wf["links"]:
        src, dst = nodes[source], nodes[target]
        declared_outputs = DECLARATIONS[src["type"]]["output"]
        assert declared_outputs[slot] == kind, (link_id, src["type"], slot, kind)
        assert src["outputs"][slot]["type"] == kind and link_id in src["outputs"][slot]["links"]
        entry = dst["inputs"][target_slot]
        assert entry["link"] == link_id, (link_id, dst["type"], entry)
        declared = dict(cw.declared_inputs(DECLARATIONS[dst["type"]]))
        assert entry["name"] in declared, (dst["type"], entry["name"])
        accepted = cw.input_kind(declared[entry["name"]])
        assert accepted in (kind, "*"), f"{name}: link {link_id} {kind} -> {dst['type']}.{entry['name']} ({accepted})"
        assert entry["type"] == accepted
    # every link listed by a node is in the link table, and outputs are declared in order
    table = cw.link_table(wf)
    for node in wf["nodes"]:
        for entry in node.get("inputs", []):
            assert entry.get("link") is None or entry["link"] in table
        if node["type"] in cw.FRONTEND_ONLY:
            continue
        assert [o["type"] for o in node.get("outputs", [])] == list(DECLARATIONS[node["type"]]["output"])
        for output in node.get("outputs", []):
            assert all(table[i][1] == node["id"] for i in output.get("links") or [])


def test_enabled_nodes_have_all_required_inputs(workflow):
    """What the server's validation would reject: a required non-widget input left open on a node that runs, or fed
    by a muted node."""
    name, wf = workflow
    nodes = {n["id"]: n for n in wf["nodes"]}
    table = cw.link_table(wf)
    for node in wf["nodes"]:
        if node["type"] in cw.FRONTEND_ONLY or node["mode"] == cw.MODE_NEVER:
            continue
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        for input_name, spec in DECLARATIONS[node["type"]]["input"]["required"].items():
            if cw.is_widget(spec):
                continue
            assert input_name in linked, f"{name}: {node['type']} {node['id']}.{input_name} is not connected"
            assert nodes[table[linked[input_name]][1]]["mode"] == cw.MODE_ALWAYS, (name, node["id"], input_name)


def test_api_conversion_names_every_widget_value():
    prompt = cw.to_api(cw.load(cw.EXTRACT), DECLARATIONS)
    (train,) = cw.nodes_of(prompt, "TrainConceptTokens")
    inputs = prompt[train]["inputs"]
    assert inputs["steps"] == 500 and inputs["seed"] == 20 and inputs["update"] == "sequential"
    assert "control_after_generate" not in inputs
    assert inputs["concepts"][1] == 0 and prompt[inputs["concepts"][0]]["class_type"] == "EditConcepts"
    assert not any(v["class_type"] in cw.FRONTEND_ONLY for v in prompt.values())


@pytest.mark.parametrize("concepts", [1, 2, 5])
def test_extract_renders_every_concept_from_one_sampling_branch(concepts):
    """The number of concepts is only known after localization (at least one). One Compose Concept Prompt in list
    mode feeds the only sampler, so everything after it runs once per concept and once for all of them, however
    many there are; nothing is muted."""
    wf = cw.load(cw.EXTRACT)
    assert all(n["mode"] == cw.MODE_ALWAYS for n in wf["nodes"])
    nodes = {n["id"]: n for n in wf["nodes"]}
    (compose,) = [n for n in wf["nodes"] if n["type"] == "ComposeConceptPrompt"]
    template, mode = compose["widgets_values"]
    names = [f"concept/concept_{i + 1}" for i in range(concepts)]
    prompts = compose_prompts(template, names, mode)
    assert [label for label, _ in prompts] == [str(i + 1) for i in range(concepts)] + ["all"]
    for i, (_, text) in enumerate(prompts[:-1]):
        assert text.count("embedding:") == 1 and f"embedding:{names[i]}" in text
    assert all(f"embedding:{n}" in prompts[-1][1] for n in names)
    # the sampler's positive prompt is the list; its result goes to a Save Image and into the contact sheet
    (sampler,) = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    sources = {(nodes[s]["type"], slot, nodes[t]["type"], t_slot) for _, s, slot, t, t_slot, _ in wf["links"]}
    assert ("ComposeConceptPrompt", 1, "KSampler", 1) in sources  # conditioning -> positive
    assert sorted(nodes[n]["type"] for n in cw.downstream(wf, compose["id"])) == sorted(
        ["ComposeConceptPrompt", "KSampler", "VAEDecode", "SaveImage", "ConceptContactSheet", "SaveImage"]
    )
    assert {
        ("VAEDecode", 0, "ConceptContactSheet", 0),  # the renders
        ("ComposeConceptPrompt", 2, "ConceptContactSheet", 1),  # their labels
        ("EditConcepts", 2, "ConceptContactSheet", 2),  # the numbered overlay of the concepts trained
        ("ConceptContactSheet", 0, "SaveImage", 0),
    } <= sources
    assert sampler["id"] in cw.downstream(wf, compose["id"])


def test_templates_offer_the_checkpoint_download_the_way_comfyuis_own_templates_do():
    """The loader's properties.models entry (name, url, directory) is what the frontend's missing-models warning
    reads: the name must be the widget's value, the URL a Hugging Face download of that file (the frontend only
    offers downloads from a few hosts and for .safetensors/.ckpt/...), the directory a models folder."""
    for name in cw.WORKFLOW_NAMES:
        (loader,) = [n for n in cw.load(name)["nodes"] if n["type"] == "CheckpointLoaderSimple"]
        (model,) = loader["properties"]["models"]
        assert set(model) == {"name", "url", "directory"}
        assert model["name"] == loader["widgets_values"][0] and model["name"].endswith(".safetensors")
        assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])
        assert model["directory"] == "checkpoints"


def test_extract_loads_the_packs_example_image():
    from concept_express.nodes.example import EXAMPLE_IMAGE_NAME

    (load,) = [n for n in cw.load(cw.EXTRACT)["nodes"] if n["type"] == "LoadImage"]
    assert load["widgets_values"][0] == EXAMPLE_IMAGE_NAME == cw.EXAMPLE_IMAGE


def test_template_file_names_read_as_titles():
    """The Templates dialog shows a pack's template under its file name, and its description is that name with
    "-" and "_" turned into spaces: plain words, capitalised, not the old one-word names."""
    for name in cw.WORKFLOW_NAMES:
        assert re.fullmatch(r"[A-Z][a-z]+( [a-z]+){3,7}", name), name


def test_extract_previews_every_intermediate_result():
    wf = cw.load(cw.EXTRACT)
    nodes = {n["id"]: n for n in wf["nodes"]}
    shown = set()
    for _, source, slot, target, _, _kind in wf["links"]:
        if nodes[target]["type"] in ("PreviewImage", "SaveImage", "MaskToImage"):
            shown.add((nodes[source]["type"], slot))
    assert {
        ("CaptureAttention", 1),
        ("LocalizeConcepts", 1),
        ("LocalizeConcepts", 2),
        ("TrainConceptTokens", 2),
    } <= shown
    save_prefixes = sorted(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "SaveImage")
    assert save_prefixes == ["ConceptExpress/concept", "ConceptExpress/contact_sheet"]


def test_reuse_loads_the_set_the_extract_workflow_writes():
    extract, reuse = cw.load(cw.EXTRACT), cw.load(cw.REUSE)
    (train,) = [n for n in extract["nodes"] if n["type"] == "TrainConceptTokens"]
    slots = cw.widget_slots(DECLARATIONS["TrainConceptTokens"])
    prefix = {s.input: v for s, v in zip(slots, train["widgets_values"]) if s.kind == "value"}["name_prefix"]
    (loader,) = [n for n in reuse["nodes"] if n["type"] == "LoadConceptTokens"]
    assert loader["widgets_values"] == [prefix]
    assert not [n for n in reuse["nodes"] if n["type"] in ("TrainConceptTokens", "CaptureAttention")]


def _edit_values(wf):
    (edit,) = [n for n in wf["nodes"] if n["type"] == "EditConcepts"]
    slots = cw.widget_slots(DECLARATIONS["EditConcepts"])
    return edit, {s.input: v for s, v in zip(slots, edit["widgets_values"])}


def test_extract_trains_what_edit_concepts_passes_and_it_passes_everything_by_default():
    wf = cw.load(cw.EXTRACT)
    nodes = {n["id"]: n for n in wf["nodes"]}
    edit, values = _edit_values(wf)
    assert values == {
        "keep": "",
        "drop": "",
        "merge": "",
        "split_instances": False,
        "split_min_area": 0.01,
        "names": "",
    }
    sources = {(nodes[s]["type"], slot, nodes[t]["type"], t_slot) for _, s, slot, t, t_slot, _ in wf["links"]}
    assert ("LocalizeConcepts", 0, "EditConcepts", 0) in sources
    assert ("EditConcepts", 0, "TrainConceptTokens", 3) in sources
    assert not [x for x in sources if x[0] == "LocalizeConcepts" and x[2] == "TrainConceptTokens"]
    assert ("EditConcepts", 2, "PreviewImage", 0) in sources  # the concepts that will be trained, as numbered


def test_masks_template_feeds_load_images_mask_to_localize_concepts():
    wf = cw.load(cw.MASKS)
    nodes = {n["id"]: n for n in wf["nodes"]}
    sources = {
        (nodes[s]["type"], slot, nodes[t]["type"], nodes[t]["inputs"][t_slot]["name"])
        for _, s, slot, t, t_slot, _ in wf["links"]
    }
    assert ("LoadImage", 1, "LocalizeConcepts", "masks") in sources
    assert ("LocalizeConcepts", 0, "EditConcepts", "concepts") in sources
    assert ("EditConcepts", 0, "TrainConceptTokens", "concepts") in sources
    (localize,) = [n for n in wf["nodes"] if n["type"] == "LocalizeConcepts"]
    slots = cw.widget_slots(DECLARATIONS["LocalizeConcepts"])
    assert {s.input: v for s, v in zip(slots, localize["widgets_values"])}["mode"] == "masks only"
    _, values = _edit_values(wf)
    assert values["names"] == "painted" and not values["keep"] and not values["merge"]
    prompt = cw.to_api(wf, DECLARATIONS)
    (load,) = cw.nodes_of(prompt, "LoadImage")
    assert prompt[load]["inputs"]["image"] == cw.EXAMPLE_IMAGE
