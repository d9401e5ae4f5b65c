// LoRA Lab: the live loss chart, progress line, checkpoint messages and preview images inside
// every "Train LoRA (LoRA Lab)" node. The server side is report/live.py: websocket events
// loralab.progress / .sample / .checkpoint / .status, and GET /loralab/history for a page that
// (re)loads mid-run. Runs are held per workflow id and node id, independent of the nodes on
// screen, so events of a node that is not in the open graph are kept and shown once it is. Node
// ids repeat across workflows (every template has a node 5): a node shows only the runs queued
// from its own workflow (or runs queued without one, through the API).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { drawLossChart, statusText } from "./loralab_chart.js";

const TRAIN_NODE = "LoraLab_TrainLora";
const WIDGET_NAME = "loralab_live";
const MAX_SAMPLES_SHOWN = 4;
const CHART_HEIGHT = 210;
const SAMPLE_HEIGHT = 170;
const TERMINAL = new Set(["finished", "interrupted", "error"]);

const runs = new Map(); // runKey(workflow, node) -> run state, shaped like a GET /loralab/history run
const views = new Set(); // the live widgets of TrainLora nodes on any open graph

function runKey(workflow, nodeId) {
  return `${workflow || ""}|${nodeId}`;
}

function newRun(nodeId, promptId, status = "running", workflow = "") {
  return {
    node: nodeId, prompt_id: promptId, workflow, status, total: null, step: 0, global_step: 0, loss: null,
    smoothed: null, lr: null, s_per_step: null, eta_s: null, points: [], samples: [], checkpoints: [], message: "",
  };
}

/** The run an event ``d`` belongs to: a new prompt on the node starts over (the previous run's
 * chart stays until then). */
function runFor(d) {
  const id = String(d.node);
  const key = runKey(d.workflow, id);
  let run = runs.get(key);
  if (!run || (d.prompt_id && run.prompt_id !== d.prompt_id)) {
    run = newRun(id, d.prompt_id, "running", d.workflow || "");
    runs.set(key, run);
  }
  return run;
}

function appendPoints(run, points) {
  const last = run.points.length ? run.points[run.points.length - 1][0] : -Infinity;
  for (const p of points || []) if (p[0] > last) run.points.push(p);
}

function checkpointMessage(c) {
  return c.message || `Checkpoint saved to ${c.path} at step ${c.step}`;
}

const SCALARS = ["total", "step", "global_step", "loss", "smoothed", "lr", "s_per_step", "eta_s"];

function onProgress(d) {
  const run = runFor(d);
  appendPoints(run, d.points);
  for (const k of SCALARS) if (k in d) run[k] = d[k];
  if (!TERMINAL.has(run.status)) run.status = "running";
  changed(run);
}

function onStatus(d) {
  const run = runFor(d);
  run.status = d.status;
  if (d.status === "finished") run.eta_s = 0;
  if (d.status === "error" && !run.message) run.message = "Training failed: see the error ComfyUI reported.";
  changed(run);
}

function onSample(d) {
  const run = runFor(d);
  run.samples.push({ step: d.step, image: d.image });
  changed(run);
}

function onCheckpoint(d) {
  const run = runFor(d);
  const entry = { step: d.step, reason: d.reason, path: d.path, message: d.message };
  run.checkpoints.push(entry);
  run.message = checkpointMessage(entry);
  changed(run);
}

/** A run from GET /loralab/history. The server holds every point, the socket may have brought
 * newer ones while the request was under way: keep both, and a final status over "running". */
function mergeHistory(h) {
  const id = String(h.node);
  const key = runKey(h.workflow, id);
  const held = runs.get(key);
  const run = newRun(id, h.prompt_id, h.status, h.workflow || "");
  Object.assign(run, h, { node: id, workflow: h.workflow || "", points: [], samples: [...(h.samples || [])],
                          checkpoints: [...(h.checkpoints || [])] });
  appendPoints(run, h.points);
  if (held && held.prompt_id === h.prompt_id) {
    appendPoints(run, held.points);
    if ((held.global_step ?? 0) > (run.global_step ?? 0)) for (const k of SCALARS) run[k] = held[k];
    if (TERMINAL.has(held.status)) run.status = held.status;
    for (const s of held.samples) if (!run.samples.some((x) => x.image.filename === s.image.filename)) run.samples.push(s);
    if (held.checkpoints.length > run.checkpoints.length) run.checkpoints = held.checkpoints;
  }
  const lastCheckpoint = run.checkpoints[run.checkpoints.length - 1];
  run.message = lastCheckpoint ? checkpointMessage(lastCheckpoint) : run.status === "error" ? "Training failed: see the error ComfyUI reported." : "";
  runs.set(key, run);
  changed(run);
}

async function loadHistory() {
  try {
    const response = await api.fetchApi("/loralab/history");
    if (!response.ok) return;
    const body = await response.json();
    for (const h of body.runs || []) mergeHistory(h);
  } catch (e) {
    console.warn("LoRA Lab: could not load the training history", e);
  }
}

// --- the widget --------------------------------------------------------------------------------

/** The id of the workflow a node belongs to (its root graph's: a subgraph's nodes share it). */
function workflowOf(node) {
  const graph = node?.graph;
  return String(graph?.rootGraph?.id ?? graph?.id ?? app.graph?.id ?? "");
}

/** Whether ``run`` belongs to the node ``own`` (its id) of workflow ``workflow``: the server names
 * a node by its id, or for a node inside a subgraph by the execution path ending in it; a run
 * queued without a workflow (through the API) goes to that node id in any workflow. */
function runMatches(run, own, workflow) {
  return (run.workflow === workflow || !run.workflow) && (run.node === own || run.node.endsWith(`:${own}`));
}

/** The run shown on node ``own`` of ``workflow``: its own workflow's before a workflow-less one. */
function runOf(own, workflow) {
  let fallback;
  for (const run of runs.values()) {
    if (!runMatches(run, own, workflow)) continue;
    if (run.workflow === workflow && run.node === own) return run;
    if (!fallback || (run.workflow === workflow && !fallback.workflow)) fallback = run;
  }
  return fallback;
}

function runOfView(view) {
  return runOf(String(view.node.id), workflowOf(view.node));
}

function changed(run) {
  for (const view of views) if (runMatches(run, String(view.node.id), workflowOf(view.node))) view.schedule();
}

function viewURL(image) {
  const q = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder || "", type: image.type || "output" });
  return api.apiURL(`/view?${q}`);
}

function render(view) {
  const run = runOfView(view);
  try {
    drawLossChart(view.canvas, run ? run.points : []);
  } catch (e) {
    console.warn("LoRA Lab: could not draw the loss chart", e);
  }
  view.status.textContent = statusText(run);
  view.message.textContent = run?.message || "";
  view.message.style.display = run?.message ? "" : "none";
  const samples = run ? run.samples.slice(-MAX_SAMPLES_SHOWN) : [];
  const key = samples.map((s) => `${run.prompt_id}/${s.image.subfolder}/${s.image.filename}`).join("|");
  if (key !== view.samplesKey) {
    view.samplesKey = key;
    view.samples.replaceChildren(...samples.map((s) => {
      const figure = document.createElement("figure");
      figure.style.cssText = "margin:0;display:flex;flex-direction:column;align-items:center;min-width:0;flex:1;";
      const img = document.createElement("img");
      img.src = viewURL(s.image);
      img.alt = `preview at step ${s.step}`;
      img.style.cssText = `width:100%;height:${SAMPLE_HEIGHT - 18}px;object-fit:contain;`; // small previews scale up too
      const caption = document.createElement("figcaption");
      caption.textContent = `step ${s.step}`;
      figure.append(img, caption);
      return figure;
    }));
    const hadSamples = view.hasSamples;
    view.hasSamples = samples.length > 0;
    view.samples.style.display = view.hasSamples ? "flex" : "none";
    if (hadSamples !== view.hasSamples) growToFit(view.node);
  }
}

function growToFit(node) {
  const min = node.computeSize();
  if (node.size[1] < min[1]) node.setSize([node.size[0], min[1]]);
  node.graph?.setDirtyCanvas(true, true);
}

function addLiveWidget(node) {
  const root = document.createElement("div");
  root.className = "loralab-live";
  root.style.cssText = "display:flex;flex-direction:column;gap:4px;font-size:11px;width:100%;height:100%;"
    + "box-sizing:border-box;overflow:hidden;color:var(--input-text, #ddd);";
  const canvas = document.createElement("canvas");
  canvas.className = "loralab-chart";
  canvas.style.cssText = `width:100%;flex:1 1 auto;min-height:${CHART_HEIGHT - 40}px;`
    + "background:var(--comfy-input-bg, rgba(0,0,0,0.2));border-radius:4px;";
  const status = document.createElement("div");
  status.className = "loralab-status";
  status.style.cssText = "overflow-wrap:anywhere;";
  const message = document.createElement("div");
  message.className = "loralab-message";
  message.style.cssText = "color:var(--warning-text, #fc6);white-space:normal;overflow-wrap:anywhere;";
  const samples = document.createElement("div");
  samples.className = "loralab-samples";
  samples.style.cssText = `display:none;gap:4px;height:${SAMPLE_HEIGHT}px;flex:0 0 auto;`;
  root.append(canvas, status, message, samples);

  const view = { node, canvas, status, message, samples, samplesKey: null, hasSamples: false, frame: 0 };
  view.schedule = () => {
    if (view.frame) return;
    view.frame = requestAnimationFrame(() => {
      view.frame = 0;
      render(view);
    });
  };
  const widget = node.addDOMWidget(WIDGET_NAME, "loralab_chart", root, {
    hideOnZoom: false,
    getMinHeight: () => CHART_HEIGHT + (view.hasSamples ? SAMPLE_HEIGHT : 0),
  });
  widget.serialize = false; // not a widget value: saved workflows keep their positional values
  view.resize = new ResizeObserver(() => view.schedule());
  view.resize.observe(canvas);
  views.add(view);
  node.loralabView = view;
  view.schedule();
  return view;
}

function removeLiveWidget(node) {
  const view = node.loralabView;
  if (!view) return;
  view.resize.disconnect();
  if (view.frame) cancelAnimationFrame(view.frame);
  views.delete(view);
  node.loralabView = undefined;
}

function redrawAll() {
  for (const view of views) view.schedule();
}

function listen(type, handler) {
  api.addEventListener(type, (event) => {
    try {
      if (event.detail && event.detail.node !== undefined) handler(event.detail);
    } catch (e) {
      console.warn(`LoRA Lab: could not handle ${type}`, e);
    }
  });
}

/** The run shown on node ``nodeId`` of the open workflow. */
function runOfOpenNode(nodeId) {
  return runOf(String(nodeId), String(app.graph?.id ?? ""));
}

window.LoraLab = {
  /** [[step, loss, smoothed], ...] shown on node ``nodeId`` of the open workflow (a copy). */
  chartPoints: (nodeId) => (runOfOpenNode(nodeId)?.points || []).map((p) => [...p]),
  /** The status line text of node ``nodeId`` of the open workflow. */
  status: (nodeId) => statusText(runOfOpenNode(nodeId)),
};

app.registerExtension({
  name: "LoraLab.LiveTraining",
  async setup() {
    listen("loralab.progress", onProgress);
    listen("loralab.status", onStatus);
    listen("loralab.sample", onSample);
    listen("loralab.checkpoint", onCheckpoint);
    api.addEventListener("reconnected", () => loadHistory());
    await loadHistory();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== TRAIN_NODE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      addLiveWidget(this);
      return result;
    };
    const removed = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      removeLiveWidget(this);
      return removed?.apply(this, arguments);
    };
  },
  loadedGraphNode(node) {
    node.loralabView?.schedule(); // its id is known now
  },
  afterConfigureGraph() {
    redrawAll();
  },
});
