"""Policy: a loaded Pi0 / Pi0.5 checkpoint behind `predict(images, state, prompt)`.

Host-side work lives here (input checks, resize, state normalization, tokenization,
noise, action un-normalization); the model forward is a backend with the
`sample_actions(images, image_mask, tokens, token_mask, state, noise)` signature of
docs/ARCHITECTURE.md: "reference" = models.pi0.PiModel (eager PyTorch, any device),
"graph" = runtime.pi0_graph.PiGraphRuntime (CUDA graphs + fused kernels).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import kernels
from .checkpoint import load_state_dict, read_checkpoint
from .errors import CheckpointError, DeviceError, FlashRTError, InputError, OutOfMemoryError, StateError
from .images import prepare_images
from .models.pi0 import PiModel
from .normalization import load_norm_stats
from .tokenizer import PromptTokenizer, load_text_tokenizer
from .types import PolicyResult, PolicySpec

log = logging.getLogger(__name__)

OPENPI_NUM_VIEWS = 3  # base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb
# On the CPU a model this small runs single-threaded: its ops are too small to split, and
# intra-op threads only add synchronization, which on a busy 2-core machine costs ~10x.
SINGLE_THREAD_MAX_PARAMS = 50_000_000
PRECISIONS = ("fp32", "bf16", "fp8")
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise DeviceError(f"unknown device {device!r}") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} requested but CUDA is not available")
    return resolved


# The graph runtime's kernels and bf16 tensor-core GEMMs need Ampere or newer; FP8 GEMMs
# (cuBLASLt E4M3) need Ada / Hopper / Blackwell.
GRAPH_MIN_CAPABILITY = (8, 0)
FP8_MIN_CAPABILITY = (8, 9)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def resolve_precision(precision: str, device: torch.device, capability=None) -> str:
    """"auto": bf16 on a GPU that has bf16 tensor cores, else fp32."""
    if precision == "auto":
        return "bf16" if capability is not None and capability >= GRAPH_MIN_CAPABILITY else "fp32"
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; expected auto or one of {PRECISIONS}")
    if precision == "fp8" and (capability is None or capability < FP8_MIN_CAPABILITY):
        where = "the CPU" if capability is None else f"a GPU of compute capability {capability[0]}.{capability[1]}"
        raise DeviceError(f"precision fp8 needs a GPU of compute capability 8.9 or newer, not {where}; use bf16")
    return precision


def graph_runtime_class():
    """The fast runtime, or None where it is not importable (not built, no CUDA code)."""
    try:
        from .runtime.pi0_graph import PiGraphRuntime
    except ImportError as e:
        log.debug("graph runtime not importable: %s", e)
        return None
    return PiGraphRuntime


def _graph_unavailable_reason(device: torch.device, capability) -> str | None:
    """Why the graph runtime cannot run on `device` (None: it can). On a GPU it needs
    Ampere+ and the compiled kernels for that GPU: its CUDA graphs capture the kernels,
    not their PyTorch twins."""
    if graph_runtime_class() is None:
        return "is not available (flashrt_core.runtime.pi0_graph does not import)"
    if device.type != "cuda":
        return None
    if capability is None or capability < GRAPH_MIN_CAPABILITY:
        where = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        return f"needs compute capability 8.0+, this GPU is {where}"
    if not kernels.supports_capability(capability):
        reason = kernels.unavailable_reason() or (
            f"built for sm_{', sm_'.join(map(str, kernels.compiled_archs()))}, not {capability[0]}.{capability[1]}")
        return f"needs the CUDA kernels ({reason}; scripts/build_kernels.sh builds them)"
    return None


def select_backend(backend: str, device: torch.device, precision: str, capability=None) -> str:
    """"auto": the graph runtime on a GPU it supports, else (with a warning on a GPU) the
    reference model. "graph" on the CPU runs the same forward through the twins (tests)."""
    if backend not in ("auto", "reference", "graph"):
        raise DeviceError(f"unknown backend {backend!r}; expected auto, reference or graph")
    if backend == "auto":
        why = _graph_unavailable_reason(device, capability) if device.type == "cuda" else "runs on the CPU"
        backend = "graph" if why is None else "reference"
        if device.type == "cuda" and why is not None:
            log.warning("the graph runtime %s: running the (slow) reference backend on %s", why, device)
    elif backend == "graph":
        why = _graph_unavailable_reason(device, capability)
        if why is not None:
            raise DeviceError(f"the graph backend {why}")
    if backend == "reference" and precision not in _TORCH_DTYPES:
        raise DeviceError(f"precision {precision} needs the graph backend; the reference runs fp32 or bf16")
    return backend


def build_backend(name: str, config, weights, device: torch.device, precision: str, num_views: int):
    if name == "graph":
        return graph_runtime_class().from_state_dict(config, weights, device=device, precision=precision,
                                                     max_views=num_views)
    return PiModel.from_state_dict(config, weights, device=device, dtype=_TORCH_DTYPES[precision])


@contextlib.contextmanager
def gpu_memory_guard(device: torch.device, what: str, weight_bytes: int):
    """Turn a CUDA out-of-memory error into OutOfMemoryError naming the need (the
    weights, in the compute dtype) against the memory free on the device."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        raise OutOfMemoryError(
            f"out of GPU memory while {what}: the weights alone need {weight_bytes / 1e9:.1f} GB, "
            f"{free / 1e9:.1f} of {total / 1e9:.1f} GB are free on {device} ({str(e).splitlines()[0]})") from None


class Policy:
    def __init__(self, checkpoint, model: str | None = None, device: str = "auto", precision: str = "auto",
                 num_views: int | None = None, num_steps: int | None = None, backend: str = "auto",
                 norm_stats_asset: str | None = None):
        path = Path(checkpoint)
        info = read_checkpoint(path, model)
        config = info.config if num_steps is None else replace(info.config, num_steps=int(num_steps))
        self.config = config
        self.device = resolve_device(device)
        capability = device_capability(self.device)
        precision = resolve_precision(precision, self.device, capability)
        backend = select_backend(backend, self.device, precision, capability)

        self.norm = load_norm_stats(path, config.norm_mode, norm_stats_asset)
        state_dim = self.norm.state.dim or info.state_dim or config.state_dim
        action_dim = self.norm.actions.dim or info.action_dim or config.action_dim
        if state_dim > config.state_dim or action_dim > config.action_dim:
            raise CheckpointError(
                f"norm stats ({self.norm.source}) are wider (state {state_dim}, actions {action_dim}) than the "
                f"model (state {config.state_dim}, actions {config.action_dim})")
        if num_views is None:
            num_views = len(info.camera_names) if info.camera_names else OPENPI_NUM_VIEWS
        if num_views < 1:
            raise InputError(f"num_views must be >= 1, got {num_views}")
        self.tokenizer = PromptTokenizer(load_text_tokenizer(path), config.max_token_len,
                                         config.discrete_state_input)

        weights = load_state_dict(path, config)
        params = sum(t.numel() for t in weights.values())
        self._weight_bytes = params * (4 if precision == "fp32" else 2)
        with gpu_memory_guard(self.device, f"loading the {backend} backend", self._weight_bytes):
            self._backend = build_backend(backend, config, weights, self.device, precision, num_views)
        if self.device.type == "cpu" and params < SINGLE_THREAD_MAX_PARAMS:
            torch.set_num_threads(1)
        del weights
        self._generator = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**63))
        self.spec = PolicySpec(
            model=config.variant, num_views=num_views, image_size=(config.vision.image_size,) * 2,
            state_dim=state_dim, action_dim=action_dim, action_horizon=config.action_horizon,
            num_steps=config.num_steps, max_prompt_tokens=config.max_token_len, device=str(self.device),
            precision=precision, backend=backend)
        log.info("loaded %s from %s: %s backend, %s, %s; norm stats %s", config.variant, path, backend,
                 self.device, precision, self.norm.source)
        self._calibration_file = None
        self._calibration_source = None
        if precision == "fp8":
            from .runtime.precision import calibration_file, checkpoint_fingerprint, load_calibration
            self._calibration_file = calibration_file(checkpoint_fingerprint(path), f"{config.variant}_v{num_views}")
            cached = load_calibration(self._calibration_file)
            if cached is not None:
                self._backend.calibrate(amax=cached)
                self._calibration_source = "cache"
                log.info("FP8 calibration from %s", self._calibration_file)
        self._capture_graphs()

    # -- inputs ----------------------------------------------------------------------------

    def _state(self, state) -> np.ndarray:
        try:
            state = np.asarray(state, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise StateError(f"state must be a numeric vector: {e}") from e
        if state.shape != (self.spec.state_dim,):
            raise StateError(f"state must have shape ({self.spec.state_dim},), got {state.shape}")
        if not np.isfinite(state).all():
            raise StateError(f"state has non-finite values at {np.flatnonzero(~np.isfinite(state)).tolist()}")
        return state

    def _noise(self, noise, seed) -> torch.Tensor:
        shape = (self.config.action_horizon, self.config.action_dim)
        if noise is None:
            generator = self._generator if seed is None else torch.Generator().manual_seed(int(seed))
            return torch.randn(shape, generator=generator, dtype=torch.float32)
        noise = np.asarray(noise, dtype=np.float32)
        if noise.shape != shape:
            raise InputError(f"noise must have shape {shape}, got {noise.shape}")
        if not np.isfinite(noise).all():
            raise InputError("noise has non-finite values")
        return torch.from_numpy(noise.copy())

    def _backend_inputs(self, images, state, prompt, noise=None, seed=None):
        """Host-side preprocessing: the backend's sample_actions arguments, and the prompt."""
        batch, view_mask = prepare_images(images, self.spec.num_views, self.config.vision.image_size)
        state = self.norm.state.normalize(self._state(state))
        prompt = self.tokenizer.tokenize(prompt, state)
        padded_state = np.zeros(self.config.state_dim, dtype=np.float32)
        padded_state[:state.shape[0]] = state
        inputs = (torch.from_numpy(batch), torch.from_numpy(view_mask), torch.from_numpy(prompt.tokens),
                  torch.from_numpy(prompt.mask), torch.from_numpy(padded_state), self._noise(noise, seed))
        return inputs, prompt

    def _capture_graphs(self) -> None:
        """Capture every prompt bucket's graph now (graph backend), so none is captured on the
        realtime path; FP8 waits until it is calibrated."""
        prepare = getattr(self._backend, "prepare", None)
        if prepare is not None:
            started = time.perf_counter()
            with gpu_memory_guard(self.device, "capturing CUDA graphs", self._weight_bytes):
                prepare(self.spec.num_views)
            log.debug("graphs ready in %.2f s", time.perf_counter() - started)

    @property
    def needs_calibration(self) -> bool:
        """FP8 only: no calibration yet (neither cached nor measured)."""
        return self.spec.precision == "fp8" and not self._backend.fp8_ready

    @property
    def calibration_source(self) -> str | None:
        """Where the FP8 activation scales in use come from: "cache" (loaded from the
        on-disk cache at load), "observations" (measured by calibrate(), and cached),
        "provisional" (predict's automatic calibration on its first observation, not
        cached), or None (not fp8, or not calibrated yet)."""
        return self._calibration_source

    @property
    def calibration_file(self) -> Path | None:
        """Where calibrate() caches the FP8 scales of this checkpoint and view count (fp8 only)."""
        return self._calibration_file

    def calibrate(self, observations) -> None:
        """Measure FP8 activation scales on representative observations (dicts with images,
        state, prompt, as predict takes) and cache them for this checkpoint and view count.
        Real camera frames give better scales than synthetic ones; 8 or more is a good start.

        All or nothing: the backend zeroes its ranges before measuring, so if a forward
        fails part-way the scales in use before the call are put back (an uncalibrated
        model stays uncalibrated) and the error is raised."""
        if self.spec.precision != "fp8":
            raise FlashRTError("calibrate() applies to precision 'fp8'")
        inputs = [self._backend_inputs(o["images"], o["state"], o["prompt"], seed=0)[0] for o in observations]
        if not inputs:
            raise InputError("calibrate() needs at least one observation")
        previous = None if self.needs_calibration else self._backend.calibration()
        try:
            amax = self._backend.calibrate(inputs)
        except BaseException:
            if previous is not None:
                self._backend.calibrate(amax=previous)
            raise
        self._calibration_source = "observations"
        from .runtime.precision import save_calibration
        save_calibration(self._calibration_file, amax)
        log.info("FP8 calibrated on %d observations; cached in %s", len(inputs), self._calibration_file)
        self._capture_graphs()

    # -- API -------------------------------------------------------------------------------

    def predict(self, images, state, prompt, noise=None, seed=None) -> PolicyResult:
        """images: num_views HxWx3 uint8 RGB arrays (None = missing camera); state: robot units;
        noise [horizon, padded action_dim] or seed for a reproducible sample."""
        if self._backend is None:
            raise FlashRTError("policy is closed")
        start = time.perf_counter()
        inputs, prompt = self._backend_inputs(images, state, prompt, noise, seed)
        if self.needs_calibration:
            log.warning("FP8 is not calibrated for this checkpoint: calibrating on this one observation "
                        "(not cached); call Policy.calibrate() with real frames for lasting scales")
            self._backend.calibrate([inputs])
            self._calibration_source = "provisional"
            self._capture_graphs()
        prepared = time.perf_counter()

        actions = self._backend.sample_actions(*inputs).cpu().numpy()
        inferred = time.perf_counter()

        actions = self.norm.actions.unnormalize(actions)[:, :self.spec.action_dim].astype(np.float32)
        done = time.perf_counter()
        timing = {"preprocess": prepared - start, "model": inferred - prepared, "postprocess": done - inferred,
                  "total": done - start}
        return PolicyResult(actions, timing, prompt.num_tokens, prompt.truncated)

    def close(self) -> None:
        """Drop the backend and give its device memory back."""
        self._backend = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def load_policy(checkpoint, **options) -> Policy:
    """Load a Pi0 / Pi0.5 checkpoint directory (openpi or LeRobot layout).

    options (all optional): model "pi0" | "pi05" (else from config.json / the weights),
    device "auto" | "cpu" | "cuda[:N]", precision "auto" | "fp32" | "bf16" | "fp8",
    num_views (else the checkpoint's cameras, or openpi's 3), num_steps (else the config's),
    backend "auto" | "reference" | "graph", norm_stats_asset (openpi assets/<id> to use)."""
    return Policy(checkpoint, **options)
