"""What every GPU benchmark script checks before it measures anything."""

from __future__ import annotations

import sys

import torch

from flashrt_core import kernels


def require_cuda_and_kernels(tool: str) -> None:
    """Exit with the reason unless a CUDA GPU is there and the CUDA extension is usable.
    Run from the repository, the scripts import the source tree, whose kernels exist only
    after `bash scripts/build_kernels.sh` (colcon installs its build elsewhere); without
    them the runtime would fall back to plain PyTorch ops and the numbers would not be
    the engine's."""
    if not torch.cuda.is_available():
        sys.exit(f"{tool}: needs a CUDA GPU")
    if not kernels.available():
        sys.exit(f"{tool}: the CUDA kernels are not usable ({kernels.unavailable_reason()}); "
                 "build them with `bash scripts/build_kernels.sh`")
