"""Training report pieces (loss plots); plain matplotlib/PIL code, no ComfyUI imports."""
from .loss_plot import (
    build_loss_figure,
    choose_log_scale,
    png_to_image_tensor,
    render_loss_plot,
    smooth_losses,
)

__all__ = [
    "build_loss_figure",
    "choose_log_scale",
    "png_to_image_tensor",
    "render_loss_plot",
    "smooth_losses",
]
