"""flashrt_core: realtime VLA policy inference (no ROS dependency).

    policy = flashrt_core.load_policy("/path/to/pi05", num_views=2)
    result = policy.predict(images=[base_rgb, wrist_rgb], state=joint_positions, prompt="pick up the red block")
    result.actions  # float32 [horizon, action_dim], robot units
"""

from .errors import (CheckpointError, DeviceError, FlashRTError, ImageError, InputError, OutOfMemoryError,
                     PromptError, StateError, UnsupportedModelError)
from .policy import Policy, load_policy
from .types import PolicyResult, PolicySpec

__all__ = ["CheckpointError", "DeviceError", "FlashRTError", "ImageError", "InputError", "OutOfMemoryError",
           "Policy", "PolicyResult", "PolicySpec", "PromptError", "StateError", "UnsupportedModelError",
           "load_policy"]
