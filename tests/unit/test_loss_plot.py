"""Loss smoothing, the log-scale decision and the atomically written loss plot PNG."""
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from report import (
    build_loss_figure,
    choose_log_scale,
    png_to_image_tensor,
    render_loss_plot,
    smooth_losses,
)
from report import loss_plot

NAN, INF = float("nan"), float("inf")


# --- smoothing -----------------------------------------------------------------------------


def test_smooth_matches_hand_computed_debiased_ema():
    # weight 0.5: ema_n = 0.5*ema_{n-1} + 0.5*x_n (ema_0 = 0), reported as ema_n / (1 - 0.5**n)
    # n=1: 0.5 / 0.5 = 1;  n=2: 1.25 / 0.75 = 5/3;  n=3: 2.125 / 0.875 = 17/7
    assert smooth_losses([1.0, 2.0, 3.0], weight=0.5) == pytest.approx([1.0, 5 / 3, 17 / 7])


def test_smooth_default_weight_first_point_unbiased_and_constant_stays_constant():
    assert smooth_losses([4.0, 0.0], weight=0.9) == pytest.approx([4.0, 4.0 * 0.09 / 0.19])
    assert smooth_losses([0.3] * 50) == pytest.approx([0.3] * 50)


def test_smooth_weight_zero_is_identity_and_length_kept():
    vals = [0.5, 0.1, 0.9, 0.2]
    assert smooth_losses(vals, weight=0.0) == pytest.approx(vals)
    assert len(smooth_losses(list(range(1, 101)))) == 100


def test_smooth_skips_non_finite_without_poisoning_the_average():
    out = smooth_losses([1.0, NAN, 1.0, INF, 3.0], weight=0.5)
    assert math.isnan(out[1]) and out[3] == INF
    # finite positions equal smoothing the finite values alone
    assert [out[0], out[2], out[4]] == pytest.approx(smooth_losses([1.0, 1.0, 3.0], weight=0.5))


@pytest.mark.parametrize("weight", [1.0, -0.1, 2.0])
def test_smooth_rejects_bad_weight(weight):
    with pytest.raises(ValueError, match="weight"):
        smooth_losses([1.0], weight=weight)


# --- log scale decision --------------------------------------------------------------------


@pytest.mark.parametrize(
    "values,expected",
    [
        ([100.0, 10.0, 1.0], True),  # 100x range
        ([1.0, 0.5, 0.1], False),  # 10x range
        ([21.0, 1.0], True),
        ([19.0, 1.0], False),
        ([10.0, 0.0, 0.001], False),  # zero cannot be on a log axis
        ([10.0, -1.0, 0.01], False),  # negatives neither
        ([100.0, NAN, 1.0, INF], True),  # non-finite ignored
        ([5.0], False),
    ],
)
def test_choose_log_scale(values, expected):
    assert choose_log_scale(values) is expected


def _yscale(fig: Figure) -> str:
    return fig.axes[0].get_yscale()


def test_figure_uses_log_axis_only_for_wide_range():
    assert _yscale(build_loss_figure([10.0 / (i + 1) ** 1.5 for i in range(50)])) == "log"
    assert _yscale(build_loss_figure([0.2 + 0.01 * math.sin(i) for i in range(50)])) == "linear"
    assert _yscale(build_loss_figure([1.0, 0.0, 100.0])) == "linear"


def test_figure_content_steps_labels_and_curves():
    fig = build_loss_figure([3.0, 2.0, 1.0], title="My run", start_step=11)
    ax = fig.axes[0]
    raw, smooth = ax.get_lines()
    assert list(raw.get_xdata()) == [11, 12, 13] and list(raw.get_ydata()) == [3.0, 2.0, 1.0]
    assert list(smooth.get_ydata()) == pytest.approx(smooth_losses([3.0, 2.0, 1.0]))
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss" and ax.get_title() == "My run"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "smoothed"]


def test_figure_skips_non_finite_and_says_so():
    fig = build_loss_figure([1.0, NAN, 0.5, INF, 0.25])
    ax = fig.axes[0]
    raw = ax.get_lines()[0]
    assert list(raw.get_xdata()) == [1, 3, 5]  # the bad steps are left out, others keep their step
    assert np.isfinite(raw.get_ydata()).all()
    assert "2 NaN/inf values skipped" in ax.get_title()


# --- rendering -----------------------------------------------------------------------------


def _check_png(path, tmp_dir):
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (800, 450)
        arr = np.asarray(img.convert("RGB"))
    assert arr.std() > 5  # something was drawn, not a blank canvas
    assert sorted(p.name for p in tmp_dir.iterdir()) == [path.name]  # no temp files left


def test_render_writes_valid_png_and_returns_path(tmp_path):
    out = render_loss_plot([1.0 / (i + 1) for i in range(200)], tmp_path / "loss.png")
    assert out == tmp_path / "loss.png"
    _check_png(out, tmp_path)


def test_render_creates_parent_dirs_and_overwrites(tmp_path):
    target = tmp_path / "runs" / "a" / "loss.png"
    render_loss_plot([1.0, 0.5], str(target))
    first = target.read_bytes()
    render_loss_plot([5.0, 0.01, 3.0], target)
    assert target.read_bytes() != first
    _check_png(target, target.parent)


@pytest.mark.parametrize(
    "losses",
    [[0.7], [0.3] * 20, [0.0, 0.0, 0.0], [-1.0, 0.0, 2.0], [NAN, 1.0, INF, -INF, 0.5], [NAN, NAN], [INF]],
    ids=["one", "constant", "zeros", "negatives", "mixed-nonfinite", "all-nan", "only-inf"],
)
def test_render_edge_cases_do_not_crash(tmp_path, losses):
    _check_png(render_loss_plot(losses, tmp_path / "p.png"), tmp_path)


def test_all_non_finite_shows_note_instead_of_curves():
    fig = build_loss_figure([NAN, INF])
    ax = fig.axes[0]
    assert ax.get_lines() == [] and "no finite loss values" in ax.texts[0].get_text()


def test_empty_losses_raise_clear_error(tmp_path):
    with pytest.raises(ValueError, match="losses is empty"):
        render_loss_plot([], tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_temp_file_and_keeps_old_png(tmp_path, monkeypatch):
    target = render_loss_plot([1.0, 0.5], tmp_path / "loss.png")
    before = target.read_bytes()

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(loss_plot.Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        render_loss_plot([3.0, 2.0], target)
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"] and target.read_bytes() == before


def test_png_to_image_tensor_layout(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (6, 4), (255, 0, 0, 255)).save(path)
    t = png_to_image_tensor(path)
    assert t.dtype == torch.float32 and tuple(t.shape) == (1, 4, 6, 3)
    assert torch.allclose(t[0, 2, 3], torch.tensor([1.0, 0.0, 0.0]))


def test_loss_graph_node_sends_non_finite_losses_as_json_null(tmp_path, monkeypatch):
    """ComfyUI sends a node's ui dict to the browser as JSON and serves it from /history: a NaN
    there is not JSON, so the frontend would drop the message and fail to list the history."""
    import json

    import folder_paths
    from loralab.nodes_train import LossGraph

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    out = LossGraph.execute({"loss": [0.5, NAN, 0.4, INF]}, "graphs/loss")
    assert json.loads(json.dumps(out.ui["loss"], allow_nan=False)) == [0.5, None, 0.4, None]
    (image,) = out.ui["images"]
    assert (tmp_path / "graphs" / image["filename"]).is_file()
