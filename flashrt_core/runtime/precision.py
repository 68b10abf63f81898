"""GEMMs of the fast runtime in bf16 / fp32 or FP8 (E4M3), and FP8 calibration.

FP8 scheme: per-tensor weight scale (amax / 448) computed at load; per-tensor *static*
activation scale per GEMM input, measured by calibration (amax over calibration forwards
/ 448). Both scales live in device tensors that the captured graphs read at replay, so
recalibrating (e.g. on real camera frames) changes them in place without recapturing.
Calibration results are cached on disk, keyed by the checkpoint and the input shape.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from .. import ops
from ..ops.reference import FP8

log = logging.getLogger(__name__)

FP8_MAX = 448.0
CALIBRATION_VERSION = 1


class Linear:
    """y = x W^T (+ b) into a static buffer; W [out, in] in the compute dtype.

    While `recording` is set (eager calibration forwards), the running max |x| of the
    input is kept in `amax`."""

    recording = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, name: str = ""):
        self.weight, self.bias, self.name = weight, bias, name
        self.amax = torch.zeros(1, dtype=torch.float32, device=weight.device)

    def record(self, x: torch.Tensor) -> None:
        if Linear.recording:
            ops.absmax(x, out=self.amax, accumulate=True)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        self.record(x)
        if self.bias is None:
            return torch.mm(x, self.weight.t(), out=out)
        return torch.addmm(self.bias, x, self.weight.t(), out=out)

    def gelu_tanh(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """gelu_tanh(x W^T + b) in one cuBLASLt GEMM with its GELU epilogue. CUDA only, and
        only where addmm_gelu_is_tanh() said so (on CPU torch's epilogue is the exact GELU)."""
        self.record(x)
        return torch._addmm_activation(self.bias, x, self.weight.t(), use_gelu=True, out=out)


@functools.lru_cache(maxsize=None)
def addmm_gelu_is_tanh(device: torch.device) -> bool:
    """Whether torch's fused addmm + GELU on `device` computes the tanh approximation (the
    form SigLIP uses); probed once per device. Told apart where the two forms differ most relative to their value:
    pre-activations in [-3.2, -2.2] (outputs ~-0.01, the forms ~5 % apart, bf16 ~0.4 %)."""
    if device.type != "cuda":
        return False
    try:
        rows = 256
        pre = torch.linspace(-3.2, -2.2, rows, device=device).to(torch.bfloat16)
        x = torch.zeros(rows, 16, device=device, dtype=torch.bfloat16)
        x[:, 0] = pre  # x @ w copies column 0 into every output column, exactly
        w = torch.zeros(16, 16, device=device, dtype=torch.bfloat16)
        w[0] = 1
        bias = torch.zeros(16, device=device, dtype=torch.bfloat16)
        fused = torch._addmm_activation(bias, x, w, use_gelu=True)[:, 0].float()
        tanh, exact = (torch.nn.functional.gelu(pre.float(), approximate=a).to(torch.bfloat16).float()
                       for a in ("tanh", "none"))
        return bool(torch.equal(fused, tanh) or (fused - tanh).abs().max() < (fused - exact).abs().min())
    except (RuntimeError, TypeError) as e:
        log.info("fused addmm + GELU unavailable (%s): GELU as its own kernel", e)
        return False


class Fp8Linear(Linear):
    """The same GEMM with E4M3 weights and a static activation scale: x is quantized into a
    shared scratch buffer, then torch._scaled_mm (cuBLASLt FP8) with bf16 output."""

    def __init__(self, linear: Linear, scratch: torch.Tensor):
        weight = linear.weight.float()
        w_amax = weight.abs().max().clamp(min=1e-12)
        self.w_scale = (w_amax / FP8_MAX).reshape(()).to(torch.float32)
        # _scaled_mm wants the second operand column-major: keep W [N, K] and pass W.t().
        self.weight8 = (weight / self.w_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        self.bias, self.name, self.amax = linear.bias, linear.name, linear.amax
        self.act_scale = torch.ones((), dtype=torch.float32, device=weight.device)
        self.scratch = scratch
        self.set_scale_from_amax()

    @property
    def weight(self):  # the dequantized weight, for inspection and tests
        return self.weight8.float() * self.w_scale

    def set_scale_from_amax(self) -> None:
        self.act_scale.copy_((self.amax.reshape(()) / FP8_MAX).clamp(min=1e-12))

    def quantized_input(self, rows: int) -> torch.Tensor:
        """The E4M3 buffer [rows, K] this GEMM reads: a producer kernel (norm, GeGLU) that
        writes it directly with out_scale=act_scale saves a quantize pass over x."""
        k = self.weight8.shape[1]
        return self.scratch[:rows * k].view(rows, k)

    def gelu_tanh(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Not for FP8: torch's fused GELU epilogue is a bf16 / fp32 GEMM (the runtime keeps
        SigLIP, its one user, out of FP8). Inherited, it would run on the dequantized fp32
        weight; this says so instead."""
        raise NotImplementedError(f"{self.name or 'this GEMM'}: the fused GELU epilogue has no FP8 form; "
                                  "keep this layer in bf16")

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x: the bf16 input (quantized here), or quantized_input() already written."""
        if x.dtype != FP8:
            self.record(x)
            x8 = self.quantized_input(x.shape[0])
            ops.quantize_fp8(x, self.act_scale.view(1), out=x8)
            x = x8
        return torch._scaled_mm(x, self.weight8.t(), scale_a=self.act_scale, scale_b=self.w_scale,
                                bias=self.bias, out_dtype=out.dtype, out=out)


def gemm_input(linear: Linear, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(where a producer writes `linear`'s input, the out_scale it writes with): `buffer`
    in the compute dtype, or an FP8 GEMM's quantized input and static scale. Calibration
    forwards (Linear.recording) measure the unquantized input, so they get `buffer`."""
    if isinstance(linear, Fp8Linear) and not Linear.recording:
        return linear.quantized_input(buffer.shape[0]), linear.act_scale.view(1)
    return buffer, None


def fp8_capable(device: torch.device) -> bool:
    """cuBLASLt FP8 GEMMs need compute capability 8.9+ (Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# -- calibration cache --------------------------------------------------------------------


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a checkpoint: the names, sizes and first 64 KiB of its weight files."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).glob("*.safetensors")):
        digest.update(file.name.encode())
        digest.update(str(file.stat().st_size).encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]


def calibration_dir() -> Path:
    root = os.environ.get("FLASHRT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flashrt")
    return Path(root) / "calibration"


def calibration_file(fingerprint: str, shape_key: str) -> Path:
    return calibration_dir() / f"{fingerprint}_{shape_key}_v{CALIBRATION_VERSION}.json"


def load_calibration(file: Path) -> dict[str, float] | None:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if data.get("version") != CALIBRATION_VERSION:
        return None
    return {k: float(v) for k, v in data["amax"].items()}


def save_calibration(file: Path, amax: dict[str, float]) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": CALIBRATION_VERSION, "amax": amax}, indent=1, sort_keys=True))
        tmp.replace(file)
    except OSError as e:  # a read-only home must not stop the robot
        log.warning("could not cache FP8 calibration in %s: %s", file, e)
