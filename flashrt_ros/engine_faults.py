"""Engine failures during inference: which ones the policy node survives, which stop it.

A failing engine call skips its tick. Most failures pass (one out-of-memory, one odd
exception): the next tick runs as usual. The node stops itself (deactivates, which
publishes the hold) when the engine has failed `limit` calls in a row, or at once when
the CUDA context is dead: after an illegal memory access or a device-side assert the
context is poisoned ("sticky" error) and every later CUDA call in the process fails, so
only a new process recovers. Such an error is recognised by its type or message and
confirmed by a cheap probe (a device synchronize fails again only when the context is
gone; a one-off error such as a bad launch argument leaves it working).

Bad input the engine refuses (flashrt_core InputError) is not an engine failure.
Plain Python; torch is imported only to probe a CUDA device.
"""

from __future__ import annotations

from dataclasses import dataclass

# Message fragments of CUDA errors (lower case); only a failing probe makes one fatal.
CUDA_ERROR_MARKERS = ("cuda error", "illegal memory access", "device-side assert",
                      "unspecified launch failure", "illegal instruction",
                      "misaligned address")

RESTART_ADVICE = "restart the process (the CUDA context cannot be recovered in it)"
RETRY_ADVICE = ("see the log for the errors; activate to retry, or cleanup and configure "
                "to rebuild the engine")


def describe_error(error: BaseException) -> str:
    """'Type: message' on one line (for logs, diagnostics and service responses)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@dataclass(frozen=True)
class EngineFault:
    """Why the node stopped running the engine, and what the operator can do."""

    reason: str
    advice: str
    context_lost: bool  # the CUDA context is dead: the engine cannot run again here


def looks_like_cuda_error(error: BaseException) -> bool:
    """True for torch.AcceleratorError or an exception whose message names a CUDA error."""
    import sys

    torch = sys.modules.get("torch")  # an engine on CUDA has imported it
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    text = str(error).lower()
    return any(marker in text for marker in CUDA_ERROR_MARKERS)


def cuda_context_alive(device: str) -> bool:
    """Probe: does `device` still run work? False when a CUDA synchronize raises (a
    sticky error is reported again by every later call). Non-CUDA devices: True."""
    if not device.startswith("cuda"):
        return True
    import torch

    try:
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - any failure here means the context is unusable
        return False
    return True


class EngineFailures:
    """Consecutive failed calls of one engine."""

    def __init__(self):
        self.consecutive = 0

    def reset(self) -> None:
        """A call succeeded, or the node starts over (activated again)."""
        self.consecutive = 0

    def failed(self, error: BaseException, device: str, limit: int) -> EngineFault | None:
        """Count a failed call on `device`; the fault that must stop the node (the
        CUDA context is dead, or `limit` calls in a row failed), or None to go on."""
        from flashrt_core.errors import InputError

        if isinstance(error, InputError):
            return None
        self.consecutive += 1
        summary = describe_error(error)
        if looks_like_cuda_error(error) and not cuda_context_alive(device):
            return EngineFault(f"CUDA context lost on {device} ({summary})",
                               RESTART_ADVICE, context_lost=True)
        if self.consecutive >= limit:
            return EngineFault(f"engine failed {self.consecutive} calls in a row "
                               f"(last: {summary})", RETRY_ADVICE, context_lost=False)
        return None
