"""Converting a UI-format workflow (what example_workflows/ holds and the browser saves) into
the API-format prompt that POST /prompt takes, the way ComfyUI's frontend does it.

Widget values are matched to widget inputs in the order /object_info declares them; an INT input
named seed/noise_seed (or declaring control_after_generate) carries one extra UI-only value, the
"control after generate" mode. Linked inputs become [source_node_id, output_slot].
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Canvas-only nodes of the frontend (text notes): never part of the prompt it queues.
FRONTEND_ONLY = {"Note", "MarkdownNote"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control_widget(name: str, spec) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if spec[0] != "INT":
        return False
    flag = options.get("control_after_generate")
    return bool(flag) if flag is not None else name in ("seed", "noise_seed")


def _ordered_inputs(info: dict) -> list[tuple[str, list]]:
    declared = info.get("input", {})
    order = info.get("input_order") or {k: list(v) for k, v in declared.items() if k != "hidden"}
    out = []
    for group in ("required", "optional"):
        for name in order.get(group, []):
            out.append((name, declared[group][name]))
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """API-format prompt for every active node of a UI-format workflow."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] in FRONTEND_ONLY:
            continue
        node_type = node["type"]
        if node_type not in object_info:
            raise KeyError(f"node type {node_type} (node {node['id']}) is not installed")
        inputs: dict[str, object] = {}
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        position = 0
        for name, spec in _ordered_inputs(object_info[node_type]):
            if _is_widget(spec):
                if position < len(values):
                    inputs[name] = values[position]
                position += 1 + _has_control_widget(name, spec)
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node_type, "inputs": inputs,
                                   "_meta": {"title": node.get("title", node_type)}}
    return prompt


def nodes_of_type(prompt: dict, class_type: str) -> list[str]:
    """Ids of the prompt's nodes of one class."""
    return [nid for nid, node in prompt.items() if node["class_type"] == class_type]
