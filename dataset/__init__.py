"""Loading training images and captions from a folder or a user selection (no ComfyUI imports)."""
from .errors import DatasetError
from .fingerprint import folder_fingerprint
from .image_folder import (
    IMAGE_EXTENSIONS,
    ImageSet,
    caption_file,
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
    "caption_file",
    "folder_fingerprint",
    "list_image_files",
    "load_image_set",
    "load_selected_images",
    "open_image",
    "read_caption",
    "resize_image",
    "stack_images",
    "to_rgb",
]
