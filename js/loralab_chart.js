// LoRA Lab: drawing the live loss chart on a <canvas>, and the text of the status line.
// Pure functions with no side effects: ComfyUI imports every .js under js/ as an extension,
// and importing this one on its own does nothing.

export const LOG_RATIO = 20; // as report/loss_plot.py choose_log_scale: max/min above this reads better in log y

const MARGIN = { left: 46, right: 8, top: 8, bottom: 18 };

/** [min, max] of ``values`` by a loop: Math.min(...values) overflows V8's call stack beyond
 * ~125k values, which a long run's chart reaches. */
export function extent(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return [lo, hi];
}

/** True when the values are all positive and span more than LOG_RATIO (max/min). */
export function chooseLogScale(values) {
  const finite = values.filter((v) => v !== null && Number.isFinite(v));
  if (finite.length < 2) return false;
  const [min, max] = extent(finite);
  if (min <= 0) return false;
  return max / min > LOG_RATIO;
}

/** Seconds as h:mm:ss. */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–:––:––";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return `${h}:${String(m).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}

function formatLoss(v) {
  return v === null || v === undefined || !Number.isFinite(v) ? "n/a" : Number(v).toPrecision(4);
}

/** The status line for a run (see report/live.py for the fields), or a hint when there is none. */
export function statusText(run) {
  if (!run) return "No training run yet: the loss chart fills in when this node trains.";
  const steps = `${run.step ?? 0}/${run.total ?? "?"}`;
  const overall = run.global_step && run.global_step !== run.step ? ` (${run.global_step} overall)` : "";
  const loss = `loss ${formatLoss(run.loss)}`;
  const speed = run.s_per_step ? `${run.s_per_step.toFixed(2)} s/step` : "";
  const parts = (head) => [head, loss, speed].filter(Boolean).join(" · ");
  switch (run.status) {
    case "finished":
      return parts(`Finished ${steps}${overall}`);
    case "interrupted":
      return parts(`Interrupted at step ${steps}${overall}`);
    case "error":
      return parts(`Failed at step ${steps}${overall}`);
    default:
      if (!run.step) return `Starting: ${run.total ?? "?"} steps…`;
      const lr = Number.isFinite(run.lr) ? `lr ${Number(run.lr).toExponential(1)}` : ""; // follows lr_scheduler
      return [parts(`Step ${steps}${overall}`), lr, `ETA ${formatDuration(run.eta_s)}`].filter(Boolean).join(" · ");
  }
}

/** About ``count`` round tick values between lo and hi. */
function niceTicks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= raw) ?? 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

function formatTick(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(0);
  return String(Number(v.toPrecision(3)));
}

function themeColors(canvas) {
  const style = getComputedStyle(canvas);
  const text = style.getPropertyValue("--descrip-text").trim() || style.color || "#aaa";
  return { text, grid: "rgba(128,128,128,0.25)", raw: "rgba(90,160,255,0.45)", smooth: "rgb(70,150,255)" };
}

/** Draws raw (thin, light) and smoothed (bold) loss against the step, from
 * ``points`` = [[step, loss, smoothed], ...] (null where a loss was not finite). */
export function drawLossChart(canvas, points) {
  const dpr = window.devicePixelRatio || 1;
  const width = Math.max(1, canvas.clientWidth);
  const height = Math.max(1, canvas.clientHeight);
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const colors = themeColors(canvas);
  ctx.font = "10px sans-serif";
  ctx.fillStyle = colors.text;

  const shown = points.filter((p) => p[1] !== null && Number.isFinite(p[1]));
  if (shown.length === 0) {
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(points.length ? "no finite loss values yet" : "loss chart: no points yet", width / 2, height / 2);
    return;
  }
  const raw = shown.map((p) => p[1]);
  const smooth = shown.map((p) => p[2]).filter((v) => v !== null && Number.isFinite(v));
  const log = chooseLogScale(raw);
  const fy = log ? (v) => Math.log10(v) : (v) => v;
  let [yLo, yHi] = extent(raw.concat(smooth).map(fy));
  if (yHi - yLo < 1e-12) {
    const pad = Math.abs(yHi) * 0.1 || 0.5;
    yLo -= pad;
    yHi += pad;
  } else {
    const pad = (yHi - yLo) * 0.05;
    yLo -= pad;
    yHi += pad;
  }
  let xLo = shown[0][0];
  let xHi = shown[shown.length - 1][0];
  if (xHi === xLo) {
    xLo -= 1;
    xHi += 1;
  }
  const plotW = width - MARGIN.left - MARGIN.right;
  const plotH = height - MARGIN.top - MARGIN.bottom;
  const px = (x) => MARGIN.left + ((x - xLo) / (xHi - xLo)) * plotW;
  const py = (v) => MARGIN.top + (1 - (fy(v) - yLo) / (yHi - yLo)) * plotH;

  // grid and axis labels
  ctx.strokeStyle = colors.grid;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  const yTicks = log ? niceTicks(Math.ceil(yLo), Math.floor(yHi), 4).filter(Number.isInteger) : niceTicks(yLo, yHi, 4);
  for (const t of yTicks) {
    const y = MARGIN.top + (1 - (t - yLo) / (yHi - yLo)) * plotH;
    if (y < MARGIN.top - 0.5 || y > MARGIN.top + plotH + 0.5) continue;
    ctx.beginPath();
    ctx.moveTo(MARGIN.left, y);
    ctx.lineTo(MARGIN.left + plotW, y);
    ctx.stroke();
    ctx.fillText(log ? formatTick(Math.pow(10, t)) : formatTick(t), MARGIN.left - 4, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const xTicks = niceTicks(xLo, xHi, Math.max(2, Math.floor(plotW / 70))).filter((t) => Number.isInteger(t));
  for (const t of xTicks) {
    const x = px(t);
    if (x < MARGIN.left - 0.5 || x > MARGIN.left + plotW + 0.5) continue;
    ctx.fillText(String(t), x, MARGIN.top + plotH + 3);
  }
  ctx.strokeRect(MARGIN.left, MARGIN.top, plotW, plotH);

  // curves: at most ~2 points per pixel column, so a 100k-step run draws as fast as a short one
  const stride = Math.max(1, Math.floor(shown.length / Math.max(1, 2 * plotW)));
  const curve = (index, color, lineWidth) => {
    const pts = [];
    for (let i = 0; i < shown.length; i += stride) pts.push(shown[i]);
    if (pts[pts.length - 1] !== shown[shown.length - 1]) pts.push(shown[shown.length - 1]);
    const usable = pts.filter((p) => p[index] !== null && Number.isFinite(p[index]) && (!log || p[index] > 0));
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = lineWidth;
    if (usable.length === 1) {
      ctx.beginPath();
      ctx.arc(px(usable[0][0]), py(usable[0][index]), lineWidth + 1, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    ctx.beginPath();
    usable.forEach((p, i) => (i === 0 ? ctx.moveTo(px(p[0]), py(p[index])) : ctx.lineTo(px(p[0]), py(p[index]))));
    ctx.stroke();
  };
  ctx.save();
  ctx.beginPath();
  ctx.rect(MARGIN.left, MARGIN.top, plotW, plotH);
  ctx.clip();
  curve(1, colors.raw, 1);
  curve(2, colors.smooth, 2.2);
  ctx.restore();

  // legend
  ctx.textAlign = "right";
  ctx.textBaseline = "top";
  ctx.fillStyle = colors.smooth;
  ctx.fillText(`smoothed${log ? " (log y)" : ""}`, MARGIN.left + plotW - 4, MARGIN.top + 3);
  ctx.fillStyle = colors.raw;
  ctx.fillText("loss", MARGIN.left + plotW - 4, MARGIN.top + 15);
}
