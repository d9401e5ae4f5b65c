"""The pack in the real ComfyUI web page: headless Chromium (Playwright) against a real server
and the real comfyui-frontend-package.

One page is shared by the tests: the node search finds the LoRA Lab nodes; template 1 opens from
the template browser, runs from the Run button on the tiny model, and the Train LoRA node's live
chart gets points while the run is going. Screenshots go to artifacts/browser/;
LORALAB_UPDATE_SCREENSHOT=1 also copies the mid-run one to docs/screenshots/live_chart_midrun.png.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors import safe_open

from devkit.comfy_host import PACK_LINK_NAME, execution_error

ROOT = Path(__file__).resolve().parents[2]
TRAIN_NODE = "LoraLab_TrainLora"
SAVE_NODE = "LoraLab_SaveLoRA"
TEMPLATE = "loralab_basic_lora"  # template 1: example_workflows/loralab_basic_lora.json
VIEWPORT = {"width": 1600, "height": 1100}
TOP_OVERLAYS_PX = 150  # the banner, workflow tabs and Run bar drawn over the top of the canvas
DOC_SCREENSHOT = ROOT / "docs" / "screenshots" / "live_chart_midrun.png"
SEARCH_ATTEMPTS = 3  # double-clicks on empty canvas before the node search counts as broken
SEARCH_WAIT_MS = 30_000  # per double-click, for the search box to show
RUN_TIMEOUT_S = 1200  # a loaded 2-core CPU trains the tiny model at up to ~10 s/step

APP_READY = """() => !!(window.app?.graph && window.app.canvas && window.LoraLab
    && window.LiteGraph?.registered_node_types?.LoraLab_TrainLora)"""

# A screen point over empty canvas (no node, no panel above it), for the double-click that opens
# the node search.
EMPTY_CANVAS_POINT = """() => {
  const el = app.canvas.canvas, r = el.getBoundingClientRect(), ds = app.canvas.ds;
  for (let y = r.top + 200; y < r.bottom - 100; y += 40)
    for (let x = r.left + 120; x < r.right - 120; x += 40) {
      const [gx, gy] = ds.convertCanvasToOffset([x - r.left, y - r.top]);
      if (document.elementFromPoint(x, y) === el && !app.graph.getNodeOnPos(gx, gy)
          && !app.graph.getGroupOnPos?.(gx, gy)) return [x, y];
    }
  return null;
}"""

# Zooms and scrolls the canvas so the whole node is in view below the top overlays; returns the
# node's rectangle on the page (for a screenshot clip).
FRAME_NODE = """([id, top]) => {
  const node = app.graph.getNodeById(id), ds = app.canvas.ds, el = app.canvas.canvas;
  const title = LiteGraph.NODE_TITLE_HEIGHT, r = el.getBoundingClientRect();
  const height = node.size[1] + title;
  ds.scale = Math.min(1, (r.height - top - 20) / height);
  ds.offset[0] = r.width / 2 / ds.scale - (node.pos[0] + node.size[0] / 2);
  ds.offset[1] = top / ds.scale - (node.pos[1] - title);
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  const [x, y] = ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
  return { x: r.left + x - 6, y: r.top + y - 6, width: node.size[0] * ds.scale + 12, height: height * ds.scale + 12 };
}"""

# The element of the Train LoRA node's live widget (chart canvas + status line).
LIVE_OF = "(id) => app.graph.getNodeById(id).widgets.find((w) => w.element?.querySelector('canvas.loralab-chart')).element"


@dataclass
class Ui:
    """The shared page and what went wrong in it that concerns this pack."""

    page: object
    problems: list[str] = field(default_factory=list)

    def watch(self) -> None:
        def on_console(msg):
            where = (msg.location or {}).get("url", "")
            if msg.type in ("error", "warning") and (PACK_LINK_NAME in where or "LoRA Lab" in msg.text):
                self.problems.append(f"console {msg.type} at {where}: {msg.text}")

        def on_page_error(error):
            if PACK_LINK_NAME in (error.stack or "") or "LoRA Lab" in str(error):
                self.problems.append(f"uncaught: {error}\n{error.stack}")

        self.page.on("console", on_console)
        self.page.on("pageerror", on_page_error)

    def nodes_of_type(self, node_type: str) -> list[int]:
        return self.page.evaluate("(t) => app.graph.nodes.filter((n) => n.type === t).map((n) => n.id)", node_type)

    def widget_value(self, node_id: int, name: str):
        return self.page.evaluate("([id, name]) => app.graph.getNodeById(id).widgets.find((w) => w.name === name).value",
                                  [node_id, name])

    def chart_points(self, node_id: int) -> list[list[float]]:
        return self.page.evaluate("(id) => window.LoraLab.chartPoints(String(id))", node_id)

    def chart_image(self, node_id: int) -> str:
        return self.page.evaluate(f"(id) => ({LIVE_OF})(id).querySelector('canvas.loralab-chart').toDataURL()", node_id)

    def live_widget(self, node_id: int) -> dict:
        """Whether the node's chart is on the page and visible, and the status line it shows."""
        return self.page.evaluate(f"""(id) => {{ const el = ({LIVE_OF})(id), c = el.querySelector('canvas.loralab-chart');
            return {{ attached: c.isConnected, visible: c.offsetWidth > 0 && c.offsetHeight > 0
                      && getComputedStyle(el).visibility !== 'hidden' && getComputedStyle(el).display !== 'none',
                      status: el.querySelector('.loralab-status').textContent }}; }}""", node_id)


def open_node_search(page, screenshot, attempts: int = SEARCH_ATTEMPTS) -> None:
    """Double-click empty canvas until the node search box shows, as a user would try again.

    Right after start-up a panel, dialog or toast may still cover the canvas, and the page may
    not yet handle a double-click (seen once in CI on a loaded machine: the box never opened).
    Each attempt closes what is open (Escape), waits for a free spot and double-clicks it.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    search = page.locator(".comfy-vue-node-search-box input")
    for attempt in range(1, attempts + 1):
        page.keyboard.press("Escape")
        try:
            point = page.wait_for_function(EMPTY_CANVAS_POINT, timeout=60_000).json_value()
        except PlaywrightTimeout:
            shot = screenshot(page, "00_no_empty_canvas")
            raise AssertionError(f"found no empty spot on the canvas to double-click (page: {shot})") from None
        page.mouse.dblclick(*point)
        try:
            search.wait_for(state="visible", timeout=SEARCH_WAIT_MS)
            return
        except PlaywrightTimeout:
            shot = screenshot(page, f"00_no_node_search_{attempt}")
    raise AssertionError(f"the node search did not open after {attempts} double-clicks on empty canvas (last page: {shot})")


@pytest.fixture(scope="module")
def ui(chromium, browser_server):
    # A fresh user opens the template browser by itself on first load; the tests open it through
    # its sidebar button instead, so the page starts the same way every time.
    browser_server.post_json("/settings/Comfy.TutorialCompleted", True)
    context = chromium.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(120_000)
    ui = Ui(page)
    ui.watch()
    page.goto(browser_server.url + "/")
    page.wait_for_function(APP_READY, timeout=180_000)
    yield ui
    context.close()


def test_node_search_finds_lora_lab_nodes(ui, browser_server, screenshot):
    page = ui.page
    info = browser_server.get_json("/object_info")
    ours = {d["display_name"] for d in info.values() if d.get("python_module") == f"custom_nodes.{PACK_LINK_NAME}"}
    train_name = info[TRAIN_NODE]["display_name"]
    assert train_name in ours

    open_node_search(page, screenshot)
    page.keyboard.type("LoRA Lab")
    page.get_by_role("option", name=train_name, exact=True).wait_for(state="visible")
    shown = set(page.get_by_role("option").evaluate_all("(els) => els.map((e) => e.getAttribute('aria-label'))"))
    screenshot(page, "01_node_search")
    assert ours <= shown, f"LoRA Lab nodes missing from the node search: {sorted(ours - shown)}"

    # Picking the result adds the node to the graph, with the live chart widget of the extension.
    before = ui.nodes_of_type(TRAIN_NODE)
    charts_before = page.locator("canvas.loralab-chart").count()
    page.get_by_role("option", name=train_name, exact=True).click()
    page.wait_for_function("([t, n]) => app.graph.nodes.filter((x) => x.type === t).length > n", arg=[TRAIN_NODE, len(before)])
    added = sorted(set(ui.nodes_of_type(TRAIN_NODE)) - set(before))
    assert len(added) == 1
    page.wait_for_function("(n) => document.querySelectorAll('canvas.loralab-chart').length > n", arg=charts_before)
    assert ui.chart_points(added[0]) == []
    assert not ui.problems, "\n".join(ui.problems)


def test_template_trains_with_live_chart(ui, browser_server, screenshot):
    page = ui.page
    template = browser_server.get_json(f"/api/workflow_templates/{PACK_LINK_NAME}/{TEMPLATE}.json")
    expected_nodes = sorted([n["id"], n["type"]] for n in template["nodes"])

    # Template 1 from the template browser: sidebar → Templates → the pack's folder → the card.
    page.locator("button.templates-tab-button").click()
    page.get_by_role("button", name=PACK_LINK_NAME, exact=True).click()
    card = page.locator(f'[data-testid="template-workflow-{TEMPLATE}"]')
    card.click()
    card.wait_for(state="hidden")
    page.wait_for_function("(want) => JSON.stringify(app.graph.nodes.map((n) => [n.id, n.type]).sort((a, b) => a[0] - b[0]))"
                           " === JSON.stringify(want)", arg=expected_nodes)
    (train_id,) = ui.nodes_of_type(TRAIN_NODE)
    (save_id,) = ui.nodes_of_type(SAVE_NODE)
    steps = ui.widget_value(train_id, "steps")
    lora_prefix = Path(ui.widget_value(save_id, "prefix")).name
    loras_dir = browser_server.base_dir / "output" / "loras"
    loras_before = set(loras_dir.glob("*.safetensors"))
    node_box = page.evaluate(FRAME_NODE, [train_id, TOP_OVERLAYS_PX])
    screenshot(page, "02_template_loaded")
    empty_chart = ui.chart_image(train_id)

    # Run, from the Run button; the page posts the graph to /prompt.
    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as posted:
        page.locator('[data-testid="queue-button"]').get_by_role("button", name="Run", exact=True).click()
    reply = posted.value.json()
    assert posted.value.ok and not reply.get("node_errors"), reply
    prompt_id = reply["prompt_id"]

    # Mid-run: the chart holds a third of the steps, the rest still to come.
    page.wait_for_function("([id, lo, steps]) => { const n = window.LoraLab.chartPoints(String(id)).length;"
                           " return n >= lo && n < steps; }", arg=[train_id, max(2, steps // 3), steps],
                           polling=100, timeout=RUN_TIMEOUT_S * 1000)
    midrun = screenshot(page, "03_live_chart_midrun")
    screenshot(page, "04_train_node_midrun", clip=node_box)
    points_after_shot = ui.chart_points(train_id)
    running = [item[1] for item in browser_server.get_json("/queue")["queue_running"]]
    assert len(points_after_shot) < steps and prompt_id in running, \
        "the run ended before the mid-run screenshot was taken"
    midrun_chart = ui.chart_image(train_id)
    assert midrun_chart != empty_chart, "the chart did not redraw when points arrived"
    if os.environ.get("LORALAB_UPDATE_SCREENSHOT") == "1":
        DOC_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(midrun, DOC_SCREENSHOT)

    # The end: every step on the chart, the final chart stays, the LoRA is saved.
    entry = browser_server.wait_for(prompt_id, timeout=RUN_TIMEOUT_S)
    assert execution_error(entry) is None, execution_error(entry)
    assert entry["status"]["status_str"] == "success"
    page.wait_for_function("([id, steps]) => window.LoraLab.chartPoints(String(id)).length >= steps",
                           arg=[train_id, steps], timeout=60_000)
    points = ui.chart_points(train_id)
    assert [p[0] for p in points] == list(range(1, steps + 1))
    assert all(math.isfinite(p[1]) and p[1] > 0 and math.isfinite(p[2]) for p in points)
    status = page.evaluate("(id) => window.LoraLab.status(String(id))", train_id)
    assert f"{steps}/{steps}" in status, status
    assert ui.live_widget(train_id) == {"attached": True, "visible": True, "status": status}
    assert ui.chart_image(train_id) not in (empty_chart, midrun_chart), "the final chart was not drawn"
    # The run is the open workflow's: another workflow's node of the same id does not show it.
    workflow = page.evaluate("() => String(app.graph.id)")
    (run,) = browser_server.get_json(f"/loralab/history?node={train_id}")["runs"]
    assert run["workflow"] == workflow and workflow
    other = page.evaluate("""([id, wf]) => { const keep = app.graph.id; app.graph.id = wf;
        try { return window.LoraLab.chartPoints(String(id)).length; } finally { app.graph.id = keep; } }""",
                          [train_id, "another-workflow"])
    assert other == 0
    screenshot(page, "05_finished")
    screenshot(page, "06_train_node_finished", clip=page.evaluate(FRAME_NODE, [train_id, TOP_OVERLAYS_PX]))

    new_loras = sorted(set(loras_dir.glob("*.safetensors")) - loras_before)
    assert [p.name.startswith(f"{lora_prefix}_") for p in new_loras] == [True], new_loras
    with safe_open(str(new_loras[0]), "pt") as f:
        assert any("lora" in key for key in f.keys())
    assert not ui.problems, "\n".join(ui.problems)


# Every node's box (title bar included) and every group's title bar, as the frontend lays them out
# once the workflow is loaded (nodes with DOM widgets may grow to their minimum size); returns
# what overlaps.
LAYOUT_PROBLEMS = """async (workflow) => {
  await app.loadGraphData(workflow);
  for (let i = 0; i < 5; i++) await new Promise((r) => requestAnimationFrame(r));
  const T = LiteGraph.NODE_TITLE_HEIGHT, problems = [];
  const nodes = app.graph.nodes.map((n) => ({ name: `${n.title || n.type} (#${n.id})`,
      x: n.pos[0], y: n.pos[1] - T, w: n.size[0], h: n.size[1] + T }));
  const groups = app.graph.groups.map((g) => ({ name: `group '${g.title}'`, x: g.pos[0], y: g.pos[1],
      w: g.size[0], h: g.size[1], title: g.titleHeight }));
  const overlap = (a, b) => a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
  const inside = (a, b) => a.x >= b.x && a.y >= b.y && a.x + a.w <= b.x + b.w && a.y + a.h <= b.y + b.h;
  nodes.forEach((a, i) => nodes.slice(i + 1).forEach((b) => { if (overlap(a, b)) problems.push(`${a.name} overlaps ${b.name}`); }));
  groups.forEach((g, i) => {
    groups.slice(i + 1).forEach((h) => { if (overlap(g, h)) problems.push(`${g.name} overlaps ${h.name}`); });
    const titleBar = { x: g.x, y: g.y, w: g.w, h: g.title };
    for (const n of nodes) {
      if (overlap(n, titleBar)) problems.push(`${n.name} covers the title of ${g.name}`);
      else if (overlap(n, g) && !inside(n, g)) problems.push(`${n.name} sticks out of ${g.name}`);
    }
  });
  return problems;
}"""


def test_templates_lay_out_without_overlaps(ui, browser_server):
    """Each template as the frontend draws it: no node covers another node or a group title, and
    every node in a group fits inside it (the Train LoRA node with its live chart included)."""
    listed = browser_server.get_json("/workflow_templates")[PACK_LINK_NAME]
    assert len(listed) >= 4
    problems = {}
    for name in listed:
        workflow = browser_server.get_json(f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.json")
        found = ui.page.evaluate(LAYOUT_PROBLEMS, workflow)
        if found:
            problems[name] = found
    assert not problems, json.dumps(problems, indent=1)
    assert not ui.problems, "\n".join(ui.problems)


DRAW_LONG_RUN = """async (steps) => {
  const { drawLossChart } = await import(`/extensions/${PACK}/loralab_chart.js`);
  const canvas = document.createElement('canvas');
  canvas.style.cssText = 'width: 320px; height: 160px; position: fixed; left: 0; top: 0';
  document.body.appendChild(canvas);
  const points = [];
  for (let i = 1; i <= steps; i++) { const loss = 1 / (1 + i / 1000); points.push([i, loss, loss]); }
  try {
    drawLossChart(canvas, points);
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let painted = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) painted++;
    return painted;
  } finally {
    canvas.remove();
  }
}"""


def test_chart_draws_a_run_as_long_as_the_steps_input_allows(ui):
    """100k steps (the steps widget's maximum) draw: the y range is not taken with Math.min(...values),
    which overflows the browser's call stack on a few hundred thousand arguments."""
    painted = ui.page.evaluate(DRAW_LONG_RUN.replace("${PACK}", PACK_LINK_NAME), 100_000)
    assert painted > 2000  # the curves, axes and labels, not a blank canvas
    assert not ui.problems, "\n".join(ui.problems)
