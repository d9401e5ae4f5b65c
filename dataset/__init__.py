"""Loading training images and captions from a folder or a user selection (no ComfyUI imports)."""
from .errors import DatasetError
from .image_folder import (
    IMAGE_EXTENSIONS,
    ImageSet,
    list_image_files,
    load_image_set,
    load_selected_images,
    open_image,
    read_caption,
    stack_images,
)
from .resize import RESIZE_METHODS, resize_image, to_rgb

__all__ = [
    "DatasetError",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "RESIZE_METHODS",
    "list_image_files",
    "load_image_set",
    "load_selected_images",
    "open_image",
    "read_caption",
    "resize_image",
    "stack_images",
    "to_rgb",
]
