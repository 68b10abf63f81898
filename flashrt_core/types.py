"""Plain data types of the public engine API (no torch import needed to use them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PolicySpec:
    """What a loaded policy expects and produces.

    A ROS node sizes its subscriptions and messages from this, never from the model
    name: the numbers come from the checkpoint's config.
    """

    model: str                 # "pi0", "pi05", ...
    num_views: int             # cameras the engine was built for
    image_size: tuple[int, int]  # (height, width) the model consumes; other sizes are resized with padding
    state_dim: int             # length of the robot state vector predict() takes (un-padded)
    action_dim: int            # values per action step predict() returns (un-padded)
    action_horizon: int        # action steps per chunk
    num_steps: int             # flow-matching integration steps
    max_prompt_tokens: int     # token budget of the prompt (longer prompts are truncated)
    device: str                # "cpu", "cuda:0", ...
    precision: str             # "fp32", "bf16", "fp8"
    backend: str               # "reference" (eager PyTorch) or "graph" (static buffers + CUDA graphs)


@dataclass
class PolicyResult:
    """Output of Policy.predict."""

    actions: np.ndarray        # float32 [action_horizon, action_dim], robot units
    # Seconds spent in the parts of predict (host clock); "total" is the whole call.
    timing: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0     # tokens the prompt used (after truncation)
    truncated: bool = False    # prompt was longer than the budget and was truncated
