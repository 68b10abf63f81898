"""Fused ops of the fast runtime: one function per op, dispatched to the CUDA kernel
when every tensor is on one CUDA device, contiguous, of a dtype the kernel takes, and
the extension is built for that GPU; otherwise to the PyTorch twin
(`flashrt_core.ops.reference`, same signature and semantics).

Arguments are validated here for both paths (ValueError naming the op and the
mismatch). Every op takes `out=` so a caller can write into static buffers (nothing
allocates inside a CUDA graph); ops marked in place update their argument and return
it. `use_reference()` and env FLASHRT_DISABLE_KERNELS=1 force the twins.
"""

from __future__ import annotations

import contextlib
import os

import torch

from flashrt_core import kernels
from flashrt_core.ops import reference
from flashrt_core.ops.reference import FP8

# dtypes the kernels take for activations and per-feature parameters
KERNEL_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# dtypes the ops take at all (the twins also run fp64)
FLOATS = KERNEL_FLOATS + (torch.float64,)
# largest row the fused norm kernel keeps in registers (cuda_src/norm.cu)
MAX_NORM_DIM = 16384

_forced_reference = 0


@contextlib.contextmanager
def use_reference():
    """Run every op through its PyTorch twin inside this block (nests)."""
    global _forced_reference
    _forced_reference += 1
    try:
        yield
    finally:
        _forced_reference -= 1


def kernels_enabled() -> bool:
    """Whether dispatch may pick a kernel at all (extension loaded, not forced off)."""
    return _forced_reference == 0 and os.environ.get("FLASHRT_DISABLE_KERNELS") != "1" and kernels.available()


def _use_kernel(*tensors: torch.Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    device = present[0].device
    if device.type != "cuda" or not kernels_enabled():
        return False
    if any(t.device != device or not t.is_contiguous() for t in present):
        return False
    return kernels.device_supported(device.index)


def _launch(fn, device: torch.device, **kwargs) -> None:
    stream = torch.cuda.current_stream(device).cuda_stream
    if device.index == torch.cuda.current_device():
        fn(stream=stream, **kwargs)
    else:
        with torch.cuda.device(device):
            fn(stream=stream, **kwargs)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _code(t: torch.Tensor) -> int:
    return int(kernels.dtype_code(t.dtype))


# --- validation ---------------------------------------------------------------------


def _fail(op: str, message: str):
    raise ValueError(f"{op}: {message}")


def _check_tensor(op: str, name: str, t, dtypes=FLOATS, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        _fail(op, f"{name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if ndim is not None and t.dim() != ndim:
        _fail(op, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def _check_shape(op: str, name: str, t: torch.Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _check_same_device(op: str, ref: torch.Tensor, **named) -> None:
    for name, t in named.items():
        if t is not None and t.device != ref.device:
            _fail(op, f"{name} is on {t.device}, expected {ref.device}")


def _check_rows_input(op: str, x) -> int:
    _check_tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        _fail(op, f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    return x.shape[-1]


def _check_vectors(op: str, dim: int, **vectors) -> torch.dtype | None:
    """Per-feature parameters: shape [dim], one shared float dtype (returned)."""
    dtypes = set()
    for name, t in vectors.items():
        if t is None:
            continue
        _check_tensor(op, name, t)
        _check_shape(op, name, t, (dim,))
        dtypes.add(t.dtype)
    if len(dtypes) > 1:
        _fail(op, f"{', '.join(vectors)} must share one dtype, got {sorted(map(str, dtypes))}")
    return dtypes.pop() if dtypes else None


def _check_residual(op: str, x: torch.Tensor, residual) -> None:
    _check_tensor(op, "residual", residual)
    _check_shape(op, "residual", residual, x.shape)
    if residual.dtype != x.dtype:
        _fail(op, f"residual has dtype {residual.dtype}, expected x's {x.dtype}")
    if residual.data_ptr() == x.data_ptr():
        _fail(op, "x and residual must be distinct tensors")


def _check_out(op: str, x: torch.Tensor, out, out_scale, shape) -> torch.dtype:
    """Output dtype rule (see reference.output_dtype); FP8 needs out_scale."""
    dtype = reference.output_dtype(x.dtype, out, out_scale)
    if out is not None:
        _check_tensor(op, "out", out, FLOATS + (FP8,))
        _check_shape(op, "out", out, shape)
    if dtype not in (x.dtype, FP8):
        _fail(op, f"out has dtype {dtype}, expected x's {x.dtype} or {FP8}")
    if dtype == FP8:
        if out_scale is None:
            _fail(op, "a float8_e4m3fn output needs out_scale")
        _check_tensor(op, "out_scale", out_scale, (torch.float32,))
        if out_scale.numel() != 1:
            _fail(op, f"out_scale must hold one element, got shape {tuple(out_scale.shape)}")
    elif out_scale is not None:
        _fail(op, f"out_scale is only meaningful for a {FP8} output, not {dtype}")
    _check_same_device(op, x, out=out, out_scale=out_scale)
    return dtype


def _new_out(out, shape, dtype, device) -> torch.Tensor:
    return out if out is not None else torch.empty(shape, dtype=dtype, device=device)


# --- row norms ------------------------------------------------------------------------


def _row_norm(op, twin, twin_args, x, *, residual=None, gate=None, weight=None, weight_offset=0.0,
              mod_scale=None, shift=None, layer_norm=False, eps=1e-6, out=None, out_scale=None,
              write_output=True):
    """Validates, then runs the fused row kernel or `twin(*twin_args)`."""
    dim = _check_rows_input(op, x)
    if residual is not None:
        _check_residual(op, x, residual)
    param_dtype = _check_vectors(op, dim, gate=gate, weight=weight, scale=mod_scale, shift=shift)
    out_dtype = _check_out(op, x, out, out_scale, x.shape) if write_output else x.dtype
    _check_same_device(op, x, residual=residual, gate=gate, weight=weight, scale=mod_scale, shift=shift)
    kernel_ok = (
        x.dtype in KERNEL_FLOATS
        and (param_dtype is None or param_dtype in KERNEL_FLOATS)
        and dim <= MAX_NORM_DIM
        and _use_kernel(x, residual, gate, weight, mod_scale, shift, out, out_scale)
    )
    if not kernel_ok:
        return twin(*twin_args)
    y = _new_out(out, x.shape, out_dtype, x.device) if write_output else None
    _launch(
        kernels.module().row_norm, x.device,
        x=x.data_ptr(), residual=_ptr(residual), gate=_ptr(gate), weight=_ptr(weight),
        mod_scale=_ptr(mod_scale), shift=_ptr(shift), out=_ptr(y), out_scale=_ptr(out_scale),
        rows=x.numel() // dim, dim=dim, eps=float(eps), weight_offset=float(weight_offset),
        layer_norm=layer_norm, act_dtype=_code(x),
        param_dtype=int(kernels.dtype_code(param_dtype)) if param_dtype else 0,
        out_dtype=int(kernels.dtype_code(out_dtype)),
    )
    return y if write_output else residual


def rms_norm(x, weight=None, eps=1e-6, out=None, out_scale=None):
    """y = x * rsqrt(mean(x^2) + eps) * (1 + weight) (Gemma convention; weight None:
    no affine). x [..., D]; weight [D]."""
    return _row_norm("rms_norm", reference.rms_norm, (x, weight, eps, out, out_scale), x,
                     weight=weight, weight_offset=1.0, eps=eps, out=out, out_scale=out_scale)


def add_rms_norm(x, residual, weight=None, eps=1e-6, out=None, out_scale=None):
    """residual <- residual + x (in place); y = rms_norm(residual, weight)."""
    return _row_norm("add_rms_norm", reference.add_rms_norm, (x, residual, weight, eps, out, out_scale), x,
                     residual=residual, weight=weight, weight_offset=1.0, eps=eps, out=out, out_scale=out_scale)


def ada_rms_norm(x, scale, shift, eps=1e-6, out=None, out_scale=None):
    """y = rms(x) * (1 + scale) + shift (Pi0.5 adaRMS; scale/shift [D], per flow step)."""
    return _row_norm("ada_rms_norm", reference.ada_rms_norm, (x, scale, shift, eps, out, out_scale), x,
                     mod_scale=_required("ada_rms_norm", "scale", scale),
                     shift=_required("ada_rms_norm", "shift", shift), eps=eps, out=out, out_scale=out_scale)


def gated_add_ada_rms_norm(x, residual, gate, scale, shift, eps=1e-6, out=None, out_scale=None):
    """residual <- residual + x * gate (in place); y = rms(residual) * (1 + scale) + shift."""
    op = "gated_add_ada_rms_norm"
    return _row_norm(op, reference.gated_add_ada_rms_norm, (x, residual, gate, scale, shift, eps, out, out_scale),
                     x, residual=_required(op, "residual", residual), gate=_required(op, "gate", gate),
                     mod_scale=_required(op, "scale", scale), shift=_required(op, "shift", shift), eps=eps,
                     out=out, out_scale=out_scale)


def gated_add(x, residual, gate):
    """residual <- residual + x * gate in place; returns residual."""
    op = "gated_add"
    return _row_norm(op, reference.gated_add, (x, residual, gate), x, residual=_required(op, "residual", residual),
                     gate=_required(op, "gate", gate), write_output=False)


def layer_norm(x, weight, bias, eps=1e-6, out=None, out_scale=None):
    """y = (x - mean) * rsqrt(var + eps) * weight + bias (SigLIP)."""
    return _row_norm("layer_norm", reference.layer_norm, (x, weight, bias, eps, out, out_scale), x,
                     weight=_required("layer_norm", "weight", weight), shift=_required("layer_norm", "bias", bias),
                     layer_norm=True, eps=eps, out=out, out_scale=out_scale)


def add_layer_norm(x, residual, weight, bias, eps=1e-6, out=None, out_scale=None):
    """residual <- residual + x (in place); y = layer_norm(residual, weight, bias)."""
    op = "add_layer_norm"
    return _row_norm(op, reference.add_layer_norm, (x, residual, weight, bias, eps, out, out_scale), x,
                     residual=_required(op, "residual", residual), weight=_required(op, "weight", weight),
                     shift=_required(op, "bias", bias), layer_norm=True, eps=eps, out=out, out_scale=out_scale)


def _required(op: str, name: str, t):
    if t is None:
        _fail(op, f"{name} is required")
    return t


# --- activations ----------------------------------------------------------------------


def _gelu(op, twin, x, out, out_scale, gated):
    dim = _check_rows_input(op, x)
    if gated and dim % 2:
        _fail(op, f"last dim must be even (gate | up), got {dim}")
    features = dim // 2 if gated else dim
    shape = (*x.shape[:-1], features)
    out_dtype = _check_out(op, x, out, out_scale, shape)
    if not (x.dtype in KERNEL_FLOATS and _use_kernel(x, out, out_scale)):
        return twin(x, out, out_scale)
    y = _new_out(out, shape, out_dtype, x.device)
    _launch(kernels.module().gelu_tanh, x.device, inp=x.data_ptr(), out=y.data_ptr(), out_scale=_ptr(out_scale),
            rows=x.numel() // dim, features=features, gated=gated, act_dtype=_code(x),
            out_dtype=int(kernels.dtype_code(out_dtype)))
    return y


def gelu_tanh_mul(gate_up, out=None, out_scale=None):
    """gate_up [..., 2F] (gate | up of one fused GEMM) -> gelu_tanh(gate) * up [..., F]."""
    return _gelu("gelu_tanh_mul", reference.gelu_tanh_mul, gate_up, out, out_scale, gated=True)


def gelu_tanh(x, out=None, out_scale=None):
    """GELU with the tanh approximation (SigLIP MLP)."""
    return _gelu("gelu_tanh", reference.gelu_tanh, x, out, out_scale, gated=False)


# --- RoPE -------------------------------------------------------------------------------


def _check_rope_tables(op, cos, sin, positions, tokens, head_dim):
    _check_tensor(op, "cos", cos, (torch.float32,), ndim=2)
    _check_tensor(op, "sin", sin, (torch.float32,), ndim=2)
    if head_dim % 2:
        _fail(op, f"head_dim must be even, got {head_dim}")
    if cos.shape[1] != head_dim // 2:
        _fail(op, f"cos has shape {tuple(cos.shape)}, expected [max_pos, {head_dim // 2}]")
    _check_shape(op, "sin", sin, cos.shape)
    _check_tensor(op, "positions", positions, (torch.int32,), ndim=1)
    _check_shape(op, "positions", positions, (tokens,))


def rope(x, cos, sin, positions):
    """In-place RoPE (rotate-half) of x [T, H, Dh] at positions (int32 [T]); cos/sin are
    fp32 [max_pos, Dh/2]. A position outside the table is an IndexError on the twin
    path and NaN on the kernel path (a kernel cannot raise). Returns x."""
    op = "rope"
    _check_tensor(op, "x", x, ndim=3)
    _check_rope_tables(op, cos, sin, positions, x.shape[0], x.shape[2])
    _check_same_device(op, x, cos=cos, sin=sin, positions=positions)
    if not (x.dtype in KERNEL_FLOATS and _use_kernel(x, cos, sin, positions)):
        return reference.rope(x, cos, sin, positions)
    _launch(kernels.module().qkv_rope_split, x.device, qkv=x.data_ptr(), q_out=x.data_ptr(), k_cache=0, v_cache=0,
            cos=cos.data_ptr(), sin=sin.data_ptr(), positions=positions.data_ptr(), tokens=x.shape[0],
            num_q_heads=x.shape[1], num_kv_heads=0, head_dim=x.shape[2], max_pos=cos.shape[0], cache_rows=0,
            cache_offset=0, q_scale=1.0, act_dtype=_code(x))
    return x


def _check_qkv(op, qkv, cos, sin, positions, k_cache, v_cache, cache_offset):
    """Shapes of a fused QKV output and its KV cache; returns (T, Hq, Hkv, Dh, cache rows)."""
    _check_tensor(op, "qkv", qkv, ndim=2)
    _check_tensor(op, "k_cache", k_cache, ndim=3)
    _check_shape(op, "v_cache", v_cache, k_cache.shape)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != qkv.dtype:
            _fail(op, f"{name} has dtype {t.dtype}, expected qkv's {qkv.dtype}")
    tokens, width = qkv.shape
    cache_rows, num_kv_heads, head_dim = k_cache.shape
    if width % head_dim or width // head_dim <= 2 * num_kv_heads:
        _fail(op, f"qkv width {width} is not (Hq + 2 * {num_kv_heads}) * {head_dim} with Hq >= 1")
    if not 0 <= cache_offset <= cache_rows - tokens:
        _fail(op, f"cache rows {cache_offset}..{cache_offset + tokens} exceed the cache ({cache_rows} rows)")
    _check_rope_tables(op, cos, sin, positions, tokens, head_dim)
    _check_same_device(op, qkv, cos=cos, sin=sin, positions=positions, k_cache=k_cache, v_cache=v_cache)
    return tokens, width // head_dim - 2 * num_kv_heads, num_kv_heads, head_dim, cache_rows


def qkv_rope_split(qkv, cos, sin, positions, k_cache, v_cache, cache_offset=0, q_scale=1.0, out=None):
    """Fused-QKV epilogue: qkv [T, (Hq + 2 Hkv) * Dh] -> q [T, Hq, Dh] (RoPE, times
    q_scale; returned or written to `out`); k (RoPE) and v written in place into
    k_cache / v_cache [S_max, Hkv, Dh] at rows cache_offset .. cache_offset + T."""
    op = "qkv_rope_split"
    tokens, num_q_heads, num_kv_heads, head_dim, cache_rows = _check_qkv(
        op, qkv, cos, sin, positions, k_cache, v_cache, cache_offset)
    q_shape = (tokens, num_q_heads, head_dim)
    _check_out_like(op, qkv, out, q_shape)
    if not (qkv.dtype in KERNEL_FLOATS and _use_kernel(qkv, cos, sin, positions, k_cache, v_cache, out)):
        return reference.qkv_rope_split(qkv, cos, sin, positions, k_cache, v_cache, cache_offset, q_scale, out)
    q = _new_out(out, q_shape, qkv.dtype, qkv.device)
    _launch(kernels.module().qkv_rope_split, qkv.device, qkv=qkv.data_ptr(), q_out=q.data_ptr(),
            k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(),
            positions=positions.data_ptr(), tokens=tokens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, max_pos=cos.shape[0], cache_rows=cache_rows, cache_offset=int(cache_offset),
            q_scale=float(q_scale), act_dtype=_code(qkv))
    return q


# --- FP8, calibration -------------------------------------------------------------------


def quantize_fp8(x, scale, out=None):
    """float8_e4m3fn of x * (1 / scale), saturating at +-448; scale: float32, 1 element
    on x's device (calibration may rewrite it between graph replays)."""
    op = "quantize_fp8"
    _check_tensor(op, "x", x)
    _required(op, "scale", scale)
    if out is not None and out.dtype != FP8:
        _fail(op, f"out has dtype {out.dtype}, expected {FP8}")
    _check_out(op, x, out, scale, x.shape)
    if not (x.dtype in KERNEL_FLOATS and _use_kernel(x, scale, out)):
        return reference.quantize_fp8(x, scale, out)
    y = _new_out(out, x.shape, FP8, x.device)
    _launch(kernels.module().quantize_fp8, x.device, x=x.data_ptr(), out=y.data_ptr(), scale=scale.data_ptr(),
            n=x.numel(), act_dtype=_code(x))
    return y


def absmax(x, out=None, accumulate=False):
    """max |x| into a float32 tensor [1] on x's device (no host sync; NaN propagates).
    accumulate=True keeps the max with what `out` holds (running calibration)."""
    op = "absmax"
    _check_tensor(op, "x", x)
    if out is not None:
        _check_tensor(op, "out", out, (torch.float32,))
        _check_shape(op, "out", out, (1,))
        _check_same_device(op, x, out=out)
    elif accumulate:
        _fail(op, "accumulate=True needs out")
    if not (x.dtype in KERNEL_FLOATS and _use_kernel(x, out)):
        return reference.absmax(x, out, accumulate)
    y = _new_out(out, (1,), torch.float32, x.device)
    _launch(kernels.module().absmax, x.device, x=x.data_ptr(), out=y.data_ptr(), n=x.numel(),
            accumulate=bool(accumulate), act_dtype=_code(x))
    return y


# --- flow step, images ------------------------------------------------------------------


def euler_step(x, v, dt):
    """x <- x + dt * v in place (v may have another float dtype). Returns x."""
    op = "euler_step"
    _check_tensor(op, "x", x)
    _check_tensor(op, "v", v)
    _check_shape(op, "v", v, x.shape)
    _check_same_device(op, x, v=v)
    if not (x.dtype in KERNEL_FLOATS and v.dtype in KERNEL_FLOATS and _use_kernel(x, v)):
        return reference.euler_step(x, v, dt)
    _launch(kernels.module().euler_step, x.device, x=x.data_ptr(), v=v.data_ptr(), dt=float(dt), n=x.numel(),
            x_dtype=_code(x), v_dtype=_code(v))
    return x


def images_to_patches(images, patch=14, dtype=torch.bfloat16, out=None):
    """uint8 [V, H, W, C] -> [V * (H/p) * (W/p), C * p * p] patch rows in (c, kh, kw)
    order, value x / 255 * 2 - 1, in `dtype` (or out.dtype)."""
    op = "images_to_patches"
    _check_tensor(op, "images", images, (torch.uint8,), ndim=4)
    views, height, width, channels = images.shape
    if patch <= 0 or height % patch or width % patch:
        _fail(op, f"image size {height}x{width} is not a multiple of patch {patch}")
    shape = (views * (height // patch) * (width // patch), channels * patch * patch)
    if out is not None:
        _check_tensor(op, "out", out)
        _check_shape(op, "out", out, shape)
        _check_same_device(op, images, out=out)
        dtype = out.dtype
    elif dtype not in FLOATS:
        _fail(op, f"dtype {dtype} is not a float dtype")
    if not (dtype in KERNEL_FLOATS and _use_kernel(images, out)):
        return reference.images_to_patches(images, patch, dtype, out)
    y = _new_out(out, shape, dtype, images.device)
    _launch(kernels.module().images_to_patches, images.device, images=images.data_ptr(), out=y.data_ptr(),
            views=views, height=height, width=width, channels=channels, patch=patch,
            out_dtype=int(kernels.dtype_code(dtype)))
    return y


# --- attention --------------------------------------------------------------------------

MAX_DECODE_HEAD_DIM = 256


def decode_attention_workspace(q_shape, kv_shape, device) -> torch.Tensor:
    """Zeroed fp32 workspace for `decode_attention` with q [T, Hq, Dh] and k/v
    [S, Hkv, Dh]; allocate once per shape, outside graph capture, and reuse."""
    tokens, num_q_heads, head_dim = q_shape
    keys, num_kv_heads, _ = kv_shape
    if not kernels.available():
        return torch.zeros(0, dtype=torch.float32, device=device)
    floats = kernels.module().decode_attention_workspace_floats(
        tokens=tokens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, keys=keys)
    return torch.zeros(floats, dtype=torch.float32, device=device)


def _check_out_like(op, like, out, shape):
    if out is not None:
        _check_tensor(op, "out", out, (like.dtype,))
        _check_shape(op, "out", out, shape)
        _check_same_device(op, like, out=out)


def _check_bias(op, like, bias, tokens, keys):
    if bias is not None:
        _check_tensor(op, "bias", bias, (torch.float32,))
        if tuple(bias.shape) not in ((tokens, keys), (keys,)):
            _fail(op, f"bias has shape {tuple(bias.shape)}, expected ({tokens}, {keys}) or ({keys},)")
        _check_same_device(op, like, bias=bias)


def _attention_kernel_ok(dtype, head_dim, multiple, *tensors) -> bool:
    return (dtype in KERNEL_FLOATS and head_dim % multiple == 0 and head_dim <= MAX_DECODE_HEAD_DIM
            and _use_kernel(*tensors))


def _launch_attention(like, out_shape, out, workspace, ws_shapes, **kwargs):
    if workspace is None:
        workspace = decode_attention_workspace(*ws_shapes, like.device)
    _check_tensor("decode_attention", "workspace", workspace, (torch.float32,), ndim=1)
    _check_same_device("decode_attention", like, workspace=workspace)
    y = _new_out(out, out_shape, like.dtype, like.device)
    _launch(kernels.module().decode_attention, like.device, out=y.data_ptr(), workspace=workspace.data_ptr(),
            workspace_floats=workspace.numel(), act_dtype=_code(like), **kwargs)
    return y


def decode_attention(q, k, v, bias=None, scale=None, out=None, workspace=None):
    """softmax(q k^T * scale + bias) v for few query tokens against cached keys:
    q [T, Hq, Dh], k/v [S, Hkv, Dh] (Hq a multiple of Hkv; query head h reads KV head
    h // (Hq / Hkv)), bias fp32 [T, S] or [S] (additive; -inf masks a key), scale
    default Dh^-0.5. One kernel launch (split over keys, merged in-kernel); pass a
    `workspace` from decode_attention_workspace to keep allocation out of graphs."""
    op = "decode_attention"
    _check_tensor(op, "q", q, ndim=3)
    _check_tensor(op, "k", k, ndim=3)
    _check_shape(op, "v", v, k.shape)
    tokens, num_q_heads, head_dim = q.shape
    keys, num_kv_heads, k_dim = k.shape
    if k_dim != head_dim or keys == 0 or num_kv_heads == 0 or num_q_heads % num_kv_heads:
        _fail(op, f"q {tuple(q.shape)} and k {tuple(k.shape)} do not fit [T, Hq, Dh] / [S, Hkv, Dh], Hkv | Hq")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(op, f"{name} has dtype {t.dtype}, expected q's {q.dtype}")
    _check_same_device(op, q, k=k, v=v)
    _check_bias(op, q, bias, tokens, keys)
    _check_out_like(op, q, out, q.shape)
    scale = head_dim**-0.5 if scale is None else float(scale)
    if not _attention_kernel_ok(q.dtype, head_dim, 8, q, k, v, bias, out, workspace):
        return reference.decode_attention(q, k, v, bias, scale, out)
    return _launch_attention(
        q, q.shape, out, workspace, (q.shape, k.shape),
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), bias=_ptr(bias), tokens=tokens, num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, keys=keys,
        bias_row_stride=keys if bias is not None and bias.dim() == 2 else 0, scale=scale)


def qkv_rope_attention(qkv, cos, sin, positions, k_cache, v_cache, cache_offset, bias=None, scale=None, out=None,
                       workspace=None):
    """Attention of the action-expert step straight from the fused QKV projection, one
    launch: qkv_rope_split (k, v rows written into the caches at cache_offset..) then
    decode_attention of the rotated q (kept in fp32) against cache rows
    0 .. cache_offset + T. bias fp32 [T, S] or [S] with S = cache_offset + T; scale
    default Dh^-0.5. Returns / writes `out` [T, Hq, Dh]. The workspace is
    decode_attention_workspace((T, Hq, Dh), (S, Hkv, Dh), device)."""
    op = "qkv_rope_attention"
    tokens, num_q_heads, num_kv_heads, head_dim, cache_rows = _check_qkv(
        op, qkv, cos, sin, positions, k_cache, v_cache, cache_offset)
    keys = cache_offset + tokens
    _check_bias(op, qkv, bias, tokens, keys)
    out_shape = (tokens, num_q_heads, head_dim)
    _check_out_like(op, qkv, out, out_shape)
    scale = head_dim**-0.5 if scale is None else float(scale)
    if not _attention_kernel_ok(qkv.dtype, head_dim, 16, qkv, cos, sin, positions, k_cache, v_cache, bias, out,
                                workspace):
        return reference.qkv_rope_attention(qkv, cos, sin, positions, k_cache, v_cache, cache_offset, bias, scale,
                                            out)
    return _launch_attention(
        qkv, out_shape, out, workspace, (out_shape, (keys, num_kv_heads, head_dim)),
        q=0, k=k_cache.data_ptr(), v=v_cache.data_ptr(), bias=_ptr(bias), tokens=tokens, num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, keys=keys,
        bias_row_stride=keys if bias is not None and bias.dim() == 2 else 0, scale=scale, qkv=qkv.data_ptr(),
        cos=cos.data_ptr(), sin=sin.data_ptr(), positions=positions.data_ptr(), max_pos=cos.shape[0],
        fresh_offset=int(cache_offset), cache_rows=cache_rows)


__all__ = [
    "FLOATS",
    "KERNEL_FLOATS",
    "absmax",
    "ada_rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "decode_attention",
    "decode_attention_workspace",
    "euler_step",
    "gated_add",
    "gated_add_ada_rms_norm",
    "gelu_tanh",
    "gelu_tanh_mul",
    "images_to_patches",
    "kernels_enabled",
    "layer_norm",
    "qkv_rope_attention",
    "qkv_rope_split",
    "quantize_fp8",
    "reference",
    "rms_norm",
    "rope",
    "use_reference",
]
