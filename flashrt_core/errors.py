"""Exception types the engine raises.

Every error a caller (the ROS node, the CLI, a script) can act on has its own type,
so a node can report it precisely and keep running instead of crashing on it.
All derive from FlashRTError.
"""


class FlashRTError(Exception):
    """Base class of every error flashrt_core raises on purpose."""


class CheckpointError(FlashRTError):
    """The checkpoint directory is missing, unreadable, or does not match the model
    (missing / unexpected / mis-shaped tensors, bad config.json, no norm stats...)."""


class UnsupportedModelError(FlashRTError):
    """The model name is unknown, or cannot be inferred from the checkpoint."""


class InputError(FlashRTError, ValueError):
    """An observation or request the engine cannot run on. Subclasses say which part."""


class ImageError(InputError):
    """Wrong number of images, wrong dtype, shape or channel layout."""


class StateError(InputError):
    """State vector of the wrong length, or with NaN / inf values."""


class PromptError(InputError):
    """Empty prompt, or one the tokenizer cannot encode."""


class DeviceError(FlashRTError):
    """The requested device or precision cannot be used (no CUDA, unsupported GPU...)."""


class OutOfMemoryError(DeviceError):
    """Not enough GPU memory for the engine; the message names needed vs free bytes."""
