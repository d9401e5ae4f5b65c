"""Building UI-format workflows (what the ComfyUI frontend saves and the template browser opens)
from node definitions, so templates never depend on hand-counted widget positions.

Widget values are stored by position in the order /object_info declares the inputs (required,
then optional), with the frontend's extra "control after generate" value after seed-like INTs;
that is exactly what devkit.workflow_api.ui_to_api and the frontend read back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .workflow_api import _has_control_widget, _is_widget, _ordered_inputs

# Drawing constants of the frontend's LiteGraph canvas, to give nodes a size that fits their widgets.
TITLE_HEIGHT = 30
ROW_HEIGHT = 24
MULTILINE_ROWS = 3  # a multiline text box (a prompt) is drawn at least this many rows tall
GROUP_PADDING = 20
GROUP_TITLE = 40  # a group's title bar (font 24: 34 px) and a gap, above the title bars of its nodes
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"


@dataclass
class UINode:
    """One node being built; ``id`` is what links and groups refer to."""
    id: int
    type: str
    pos: tuple[float, float]
    size: tuple[float, float]
    widgets_values: list
    inputs: list[dict]
    outputs: list[dict]
    title: str | None = None
    color: str | None = None
    bgcolor: str | None = None
    properties: dict = field(default_factory=dict)

    def to_json(self, order: int) -> dict:
        data = {"id": self.id, "type": self.type, "pos": list(self.pos), "size": list(self.size), "flags": {},
                "order": order, "mode": 0, "inputs": self.inputs, "outputs": self.outputs,
                "properties": self.properties, "widgets_values": self.widgets_values}
        for key in ("title", "color", "bgcolor"):
            if getattr(self, key):
                data[key] = getattr(self, key)
        return data


def _is_multiline(spec) -> bool:
    return len(spec) > 1 and isinstance(spec[1], dict) and bool(spec[1].get("multiline"))


class UIWorkflow:
    """A workflow under construction against one server's /object_info."""

    def __init__(self, object_info: dict, workflow_id: str):
        self.object_info = object_info
        self.workflow_id = workflow_id
        self.nodes: list[UINode] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, node_type: str, pos: tuple[float, float], title: str | None = None, widgets: dict | None = None,
            width: float = 320, extra_height: float = 0) -> UINode:
        """A node with the given widget values (by input name; a seed's "control after generate"
        mode as ``<name>_control``); widgets not named keep their defaults."""
        widgets = widgets or {}
        if node_type not in self.object_info:
            raise KeyError(f"{node_type} is not a node type of this server")
        info = self.object_info[node_type]
        ordered = _ordered_inputs(info)
        widget_names = {name for name, spec in ordered if _is_widget(spec)}
        unknown = set(widgets) - widget_names - {f"{n}_control" for n in widget_names}
        if unknown:
            raise KeyError(f"{node_type} has no widget input(s) {sorted(unknown)}")
        values: list = []
        sockets: list[dict] = []
        for name, spec in ordered:
            if _is_widget(spec):
                values.append(widgets[name] if name in widgets else _default(name, spec))
                if _has_control_widget(name, spec):
                    values.append(widgets.get(f"{name}_control", "fixed"))
            else:
                sockets.append({"name": name, "type": _socket_type(spec), "link": None})
        outputs = [{"name": name, "type": kind, "links": [], "slot_index": i}
                   for i, (name, kind) in enumerate(zip(info.get("output_name") or info["output"], info["output"]))]
        for out, is_list in zip(outputs, info.get("output_is_list") or []):
            if is_list:
                out["shape"] = 6  # the frontend's list-output marker
        rows = max(len(sockets), len(outputs)) + len(values)
        rows += sum(MULTILINE_ROWS - 1 for _, spec in ordered if _is_widget(spec) and _is_multiline(spec))
        height = ROW_HEIGHT * rows + 10 + extra_height  # the title bar is drawn above pos
        node = UINode(len(self.nodes) + 1, node_type, pos, (width, height), values, sockets, outputs, title,
                      properties={"Node name for S&R": node_type})
        self.nodes.append(node)
        return node

    @staticmethod
    def below(node: UINode, gap: float = 14) -> float:
        """The y of a node placed under ``node``, leaving room for its own title bar."""
        return node.pos[1] + node.size[1] + TITLE_HEIGHT + gap

    def note(self, text: str, pos: tuple[float, float], size: tuple[float, float]) -> UINode:
        """A MarkdownNote: a frontend-only node that shows formatted text on the canvas."""
        node = UINode(len(self.nodes) + 1, "MarkdownNote", pos, size, [text], [], [], None, NOTE_COLOR, NOTE_BGCOLOR)
        self.nodes.append(node)
        return node

    def connect(self, source: UINode, output: str, target: UINode, input_name: str) -> None:
        """Links ``source``'s output (by name) to ``target``'s input; a widget input becomes a socket."""
        slot = next((i for i, o in enumerate(source.outputs) if o["name"] == output), None)
        if slot is None:
            raise KeyError(f"{source.type} has no output {output}")
        link_id = len(self.links) + 1
        index = next((i for i, s in enumerate(target.inputs) if s["name"] == input_name), None)
        if index is None:
            spec = dict(_ordered_inputs(self.object_info[target.type])).get(input_name)
            if spec is None:
                raise KeyError(f"{target.type} has no input {input_name}")
            target.inputs.append({"name": input_name, "type": _socket_type(spec), "link": None,
                                  "widget": {"name": input_name}})
            index = len(target.inputs) - 1
        if target.inputs[index]["link"] is not None:
            raise ValueError(f"{target.type}.{input_name} is already linked")
        target.inputs[index]["link"] = link_id
        source.outputs[slot]["links"].append(link_id)
        self.links.append([link_id, source.id, slot, target.id, index, source.outputs[slot]["type"]])

    def group(self, title: str, nodes: list[UINode], color: str) -> None:
        """A coloured frame around ``nodes`` (the frontend moves them together)."""
        left = min(n.pos[0] for n in nodes) - GROUP_PADDING
        top = min(n.pos[1] for n in nodes) - TITLE_HEIGHT - GROUP_TITLE  # a node's title is drawn above its pos
        right = max(n.pos[0] + n.size[0] for n in nodes) + GROUP_PADDING
        bottom = max(n.pos[1] + n.size[1] for n in nodes) + GROUP_PADDING
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [left, top, right - left, bottom - top],
                            "color": color, "font_size": 24, "flags": {}})

    def to_json(self) -> dict:
        order = _execution_order(self.nodes, self.links)
        return {"id": self.workflow_id, "revision": 0, "last_node_id": len(self.nodes),
                "last_link_id": len(self.links), "nodes": [n.to_json(order[n.id]) for n in self.nodes],
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4}


def _default(name: str, spec) -> object:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options")
    if choices:
        return choices[0]
    raise KeyError(f"widget {name} has no default: give it a value")


def _socket_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _execution_order(nodes: list[UINode], links: list[list]) -> dict[int, int]:
    """Topological position of each node (the frontend's ``order``; it recomputes it on load)."""
    parents = {n.id: {link[1] for link in links if link[3] == n.id} for n in nodes}
    order: dict[int, int] = {}
    while len(order) < len(nodes):
        ready = [nid for nid, ps in parents.items() if nid not in order and ps <= set(order)]
        if not ready:
            raise ValueError("the workflow has a cycle")
        for nid in sorted(ready):
            order[nid] = len(order)
    return order
