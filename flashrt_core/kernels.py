"""Loads the CUDA extension `flashrt_core._kernels` and says whether it can be used.

The extension is built by colcon (top-level CMakeLists) or `scripts/build_kernels.sh`.
Importing it needs no GPU. `available()` is False, with `unavailable_reason()` saying
why, when it is not built, fails to load, or reports a dtype table that differs from
`DType` (a stale build).
"""

from __future__ import annotations

import enum
import functools
import importlib

import torch

EXPECTED_VERSION = "1"


class DType(enum.IntEnum):
    """Dtype codes passed to the kernels; mirrors cuda_src/dtype_codes.h."""

    FLOAT32 = 0
    BFLOAT16 = 1
    FLOAT16 = 2
    FLOAT8_E4M3 = 3
    UINT8 = 4
    INT32 = 5


_TORCH_TO_CODE = {
    torch.float32: DType.FLOAT32,
    torch.bfloat16: DType.BFLOAT16,
    torch.float16: DType.FLOAT16,
    torch.float8_e4m3fn: DType.FLOAT8_E4M3,
    torch.uint8: DType.UINT8,
    torch.int32: DType.INT32,
}


def dtype_code(dtype: torch.dtype) -> DType:
    """The kernel code of a torch dtype; ValueError for one the kernels do not take."""
    try:
        return _TORCH_TO_CODE[dtype]
    except KeyError:
        raise ValueError(f"no kernel dtype code for {dtype}") from None


def _load():
    try:
        module = importlib.import_module("flashrt_core._kernels")
    except ImportError as exc:
        return None, (
            f"flashrt_core._kernels is not importable ({exc}); build it with "
            "scripts/build_kernels.sh or colcon build (needs nvcc)"
        )
    if module.version() != EXPECTED_VERSION:
        return None, f"flashrt_core._kernels version {module.version()} != expected {EXPECTED_VERSION}; rebuild it"
    expected = {str(t).removeprefix("torch."): int(c) for t, c in _TORCH_TO_CODE.items()}
    if dict(module.dtype_codes()) != expected:
        return None, f"flashrt_core._kernels dtype codes {module.dtype_codes()} != {expected}; rebuild it"
    return module, None


_MODULE, _REASON = _load()


def available() -> bool:
    """True when the extension is loaded and consistent with this Python code."""
    return _MODULE is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    return _REASON


def module():
    """The loaded extension; RuntimeError with the reason when there is none."""
    if _MODULE is None:
        raise RuntimeError(_REASON)
    return _MODULE


def compiled_archs() -> tuple[int, ...]:
    """Compute capabilities compiled into the extension, e.g. (90,) for sm_90."""
    return tuple(int(a) // 10 for a in module().compiled_archs().split(",") if a.strip())


def supports_capability(capability: tuple[int, int]) -> bool:
    """Whether the kernels run on a GPU of this compute capability: it is compiled in, or
    is newer than a compiled one (PTX is embedded and JIT-compiled)."""
    if not available():
        return False
    major, minor = capability
    return any(arch <= major * 10 + minor for arch in compiled_archs())


@functools.lru_cache(maxsize=None)
def device_supported(index: int) -> bool:
    """supports_capability() of CUDA device `index`."""
    return available() and supports_capability(torch.cuda.get_device_capability(index))
