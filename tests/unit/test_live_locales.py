"""locales/en/ names every node, input and output of the pack, in the layout ComfyUI's frontend
reads (nodeDefs.<node id>.inputs.<input>.tooltip, .outputs.<index>), and says what the schemas say."""
from __future__ import annotations

import json

import pytest

from devkit.comfy_host import PACK_DIR
from loralab.nodes_train import NODES

LOCALES = PACK_DIR / "locales" / "en"
FIX = "edit locales/en/nodeDefs.json to match the node's define_schema"


def node_defs() -> dict:
    return json.loads((LOCALES / "nodeDefs.json").read_text(encoding="utf-8"))


SCHEMAS = {cls.define_schema().node_id: cls.define_schema() for cls in NODES}


def test_every_node_has_an_entry_and_no_entry_is_stale():
    assert set(node_defs()) == set(SCHEMAS), FIX


@pytest.mark.parametrize("node_id", sorted(SCHEMAS))
def test_display_name_and_description_match_the_schema(node_id):
    entry, schema = node_defs()[node_id], SCHEMAS[node_id]
    assert entry["display_name"] == schema.display_name, FIX
    assert entry["description"] == schema.description, FIX


@pytest.mark.parametrize("node_id", sorted(SCHEMAS))
def test_every_input_has_its_name_and_a_tooltip(node_id):
    entry, schema = node_defs()[node_id], SCHEMAS[node_id]
    assert set(entry["inputs"]) == {i.id for i in schema.inputs}, FIX
    for inp in schema.inputs:
        shown = entry["inputs"][inp.id]
        assert shown["name"] == inp.id, f"{node_id}.{inp.id}: {FIX}"  # the names users know from ComfyUI
        assert shown["tooltip"].strip(), f"{node_id}.{inp.id} has no tooltip"
        if getattr(inp, "tooltip", None):
            assert shown["tooltip"] == inp.tooltip, f"{node_id}.{inp.id}: tooltip differs from the schema; {FIX}"


@pytest.mark.parametrize("node_id", sorted(SCHEMAS))
def test_every_output_has_its_name_and_a_tooltip(node_id):
    entry, schema = node_defs()[node_id], SCHEMAS[node_id]
    outputs = entry.get("outputs", {})
    assert set(outputs) == {str(n) for n in range(len(schema.outputs))}, FIX
    for n, out in enumerate(schema.outputs):
        assert outputs[str(n)]["name"] == out.display_name, f"{node_id} output {n}: {FIX}"
        assert outputs[str(n)]["tooltip"] == out.tooltip, f"{node_id} output {n}: {FIX}"


def test_main_json_names_the_category_the_nodes_use():
    main = json.loads((LOCALES / "main.json").read_text(encoding="utf-8"))
    assert {s.category for s in SCHEMAS.values()} <= set(main["nodeCategories"])
