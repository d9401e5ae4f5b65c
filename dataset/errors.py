"""The one exception type the dataset loaders raise.

A dedicated subclass lets node code tell "the user's dataset/inputs are wrong" (show the message
as-is) apart from programming errors, while still being a ValueError for generic handlers.
"""


class DatasetError(ValueError):
    """A problem with the user's images, captions or loader settings; the message says what to do."""
