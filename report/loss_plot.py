"""Loss curve PNGs for training reports and ComfyUI previews.

Uses ``matplotlib.figure.Figure`` with the Agg canvas directly instead of pyplot: no global
backend switch inside the user's ComfyUI process, no pyplot figure registry, and safe to call
from ComfyUI's worker thread.
"""
from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

FIGSIZE = (8.0, 4.5)  # inches
DPI = 100  # -> 800 x 450 pixel PNG
LOG_RATIO = 20.0  # max/min above which a log y axis reads better


def smooth_losses(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average, as TensorBoard's smoothing slider computes it.

    Debiasing divides by ``1 - weight**n`` so early points are not dragged toward zero.
    Non-finite values are passed through unchanged and do not enter the average.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"weight must be at least 0 and below 1, got {weight}.")
    out, last, count = [], 0.0, 0
    for v in values:
        v = float(v)
        if not math.isfinite(v):
            out.append(v)
            continue
        count += 1
        last = last * weight + (1.0 - weight) * v
        out.append(last / (1.0 - weight**count))
    return out


def choose_log_scale(values: Sequence[float]) -> bool:
    """True when the finite values are all positive and span more than LOG_RATIO (max/min)."""
    finite = [float(v) for v in values if math.isfinite(float(v))]
    if len(finite) < 2 or min(finite) <= 0.0:
        return False
    return max(finite) / min(finite) > LOG_RATIO


def build_loss_figure(
    losses: Sequence[float], title: str = "Training loss", start_step: int = 1
) -> Figure:
    """The loss figure (raw + smoothed curves) without saving it; the first value is ``start_step``."""
    if len(losses) == 0:
        raise ValueError("losses is empty: there is no loss to plot. Train for at least one step first.")
    raw = np.asarray([float(v) for v in losses], dtype=np.float64)
    steps = np.arange(start_step, start_step + len(raw))
    ok = np.isfinite(raw)
    skipped = int((~ok).sum())

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if skipped:
        title = f"{title}\n({skipped} NaN/inf value{'s' if skipped != 1 else ''} skipped)"
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    if ok.any():
        smooth = np.asarray(smooth_losses(raw.tolist()), dtype=np.float64)
        marker = "o" if ok.sum() == 1 else None  # a lone point has no line to draw
        ax.plot(steps[ok], raw[ok], lw=0.8, alpha=0.35, color="tab:blue", marker=marker, label="loss")
        ax.plot(steps[ok], smooth[ok], lw=2.0, color="tab:blue", marker=marker, label="smoothed")
        if choose_log_scale(raw[ok]):
            ax.set_yscale("log")
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no finite loss values to plot", ha="center", va="center",
                transform=ax.transAxes)
    fig.tight_layout()
    return fig


def render_loss_plot(
    losses: Sequence[float],
    path: Union[str, Path],
    title: str = "Training loss",
    start_step: int = 1,
) -> Path:
    """Saves the loss plot as a PNG at ``path``, atomically (readers never see half a file)."""
    path = Path(path)
    fig = build_loss_figure(losses, title, start_step)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Own temp name rather than mkstemp: mkstemp files are 0600, this keeps the user's umask.
    # Short, fixed-length: a temp name built from path.name could pass the file system's limit
    # where path's own name does not.
    tmp = path.with_name(f".loralab_{os.getpid()}_{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def png_to_image_tensor(path: Union[str, Path]) -> torch.Tensor:
    """A PNG as ComfyUI's IMAGE: [1, H, W, 3] float32 in 0..1."""
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0)
