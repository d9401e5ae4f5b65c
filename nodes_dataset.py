"""Dataset nodes: image sets with captions, from a folder or from images already in the graph."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from .dataset import RESIZE_METHODS, folder_fingerprint, load_image_set, load_selected_images, stack_images
from .dataset.buckets import apply_buckets, tensor_to_pil
from .node_inputs import first

CATEGORY = "LoRA Lab"


def _outputs():
    return [
        io.Image.Output(display_name="images", is_output_list=True, tooltip="The images, one list entry each."),
        io.String.Output(display_name="captions", is_output_list=True, tooltip="One caption per image."),
    ]


def _size_inputs():
    return [
        io.Combo.Input("resize_method", options=list(RESIZE_METHODS), default="Crop",
                       tooltip="None keeps sizes; Stretch distorts; Crop cuts the centre; Pad adds black bars."),
        io.Int.Input("width", default=512, min=8, max=8192, step=8, tooltip="Target width (ignored by None)."),
        io.Int.Input("height", default=512, min=8, max=8192, step=8, tooltip="Target height (ignored by None)."),
    ]


def _input_folder(folder):
    """The folder the user picked, under ComfyUI's input directory (an absolute path stays as is)."""
    return os.path.join(folder_paths.get_input_directory(), folder)


def _finish(image_set, resize_method, width, height, bucketing):
    if bucketing:
        image_set = apply_buckets(image_set, width, height)
    elif resize_method == "None":
        stack_images(image_set)  # raises a clear error when sizes differ
    return io.NodeOutput([img[None] for img in image_set.images], list(image_set.captions))


class LoadImageSet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraLab_LoadImageSet",
            display_name="Load Image Set (LoRA Lab)",
            category=CATEGORY,
            description="Loads every image of a folder under the input directory, with captions from same-named .txt files.",
            inputs=[
                io.Combo.Input("folder", options=folder_paths.get_input_subfolders(),
                               tooltip="A folder under ComfyUI's input directory."),
                *_size_inputs(),
                io.String.Input("default_caption", default="", multiline=False,
                                tooltip="Caption for images without a .txt file."),
                io.Boolean.Input("bucketing", default=False,
                                 tooltip="Keep each image's aspect ratio: crop it to the nearest bucket of about width x height pixels."),
            ],
            outputs=_outputs(),
        )

    @classmethod
    def fingerprint_inputs(cls, folder, **_):
        """Changes when the folder's images or captions change on disk.

        Without it ComfyUI keys its cache on the folder name alone and would reuse the old images
        and captions after the user edits a .txt or adds, removes or replaces an image.
        """
        return folder_fingerprint(_input_folder(folder))

    @classmethod
    def execute(cls, folder, resize_method, width, height, default_caption, bucketing):
        path = _input_folder(folder)
        image_set = load_image_set(path, "None" if bucketing else resize_method, width, height, default_caption)
        return _finish(image_set, resize_method, width, height, bucketing)


class ImageSetFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraLab_ImageSetFromImages",
            display_name="Image Set from Images (LoRA Lab)",
            category=CATEGORY,
            description="Makes a captioned image set from images you picked in the graph (e.g. Load Image nodes batched together).",
            is_input_list=True,
            inputs=[
                io.Image.Input("images", tooltip="The selected images: a batch, or a list of images (which may differ in size)."),
                io.String.Input("captions", default="", multiline=True,
                                tooltip="One caption per line, in image order; a single line applies to every image. "
                                        "A list of captions (e.g. Load Image Set's) gives one per image."),
                *_size_inputs(),
                io.Boolean.Input("bucketing", default=False, tooltip="Crop each image to its nearest aspect bucket."),
            ],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, images, captions, resize_method, width, height, bucketing):
        """Takes whole lists (``is_input_list``): otherwise ComfyUI would call it once per list item,
        pairing each caption of a list with the whole batch, or each image of a list with every line."""
        pictures = [img for batch in (images if isinstance(images, list) else [images]) for img in batch]
        captions = captions if isinstance(captions, list) else [captions]
        if len(captions) > 1:
            lines, what = [text.strip() for text in captions], "captions"
        else:
            lines, what = [line.strip() for line in captions[0].splitlines() if line.strip()], "lines"
        if len(lines) > 1 and len(lines) != len(pictures):
            raise ValueError(f"captions has {len(lines)} {what} but images has {len(pictures)} images: "
                             "give one caption per image, or a single line for all")
        default = lines[0] if len(lines) == 1 else ""
        resize_method, width, height, bucketing = first(resize_method), first(width), first(height), first(bucketing)
        image_set = load_selected_images([tensor_to_pil(img) for img in pictures],
                                         "None" if bucketing else resize_method, width, height, default)
        if len(lines) > 1:
            image_set.captions = lines
        return _finish(image_set, resize_method, width, height, bucketing)
