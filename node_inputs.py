"""Input values as ComfyUI hands them to nodes that take whole lists (``is_input_list``)."""
from __future__ import annotations


def first(value):
    """Scalar widget values arrive as one-element lists on is_input_list nodes."""
    return value[0] if isinstance(value, list) else value
