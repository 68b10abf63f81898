"""Action-expert ops: small-M GEMMs with fused prologue / epilogue, decode attention
and the flow step's action head. On CUDA with the extension built they run the kernels
of cuda_src/small_m_linear.cu, decode_attention.cu and velocity_euler_embed.cu; otherwise (CPU,
FLASHRT_DISABLE_KERNELS, `ops.use_reference()`, a shape the kernel does not take) the
twins of `flashrt_core.ops.expert_reference`, same signatures and semantics.

One Pi0.5 expert layer is five calls (x: residual stream [M, 1024], M = horizon):

    linear_qkv_rope(x, w_qkv, norm=AdaRmsNorm(scale1, shift1), cos=..., sin=...,
                    positions=pos, k_cache=kc, v_cache=vc, cache_offset=off, q_out=q,
                    q_scale=256 ** -0.5)                  # input norm + QKV + RoPE + cache
    decode_attention(q, kc[:S], vc[:S], bias=key_bias, scale=1.0, out=attn)
    linear_gated_residual(attn.view(M, -1), w_o, x, gate=gate1)       # x += gate1 * o
    linear_gelu_mul(x, w_gate_up, norm=AdaRmsNorm(scale2, shift2), out=h)
    linear_gated_residual(h, w_down, x, gate=gate2)                   # x += gate2 * down

Between the flow steps one more call does the action head (final norm, velocity,
Euler step, the next step's embedding; fp32 weights):

    velocity_euler_embed(x_t, res=x, norm=AdaRmsNorm(final_scale, final_shift),
                         w_out=w_out, b_out=b_out, dt=-0.1, w_in=w_in, b_in=b_in, out=x)

Weights are prepared once: `pack_qkv_rope` / `pack_gate_up` reorder rows so that the
pairs an epilogue combines sit in one thread; `quantize_weight_fp8` gives FP8 E4M3 rows
with a float32 scale each (pass both as w, w_scale: W8A16, activations stay bf16).

Nothing allocates when `out` / `q_out` are given, so the calls can be captured in a
CUDA graph; `LinearLaunch(pdl=True)` / `AttentionLaunch(pdl=True)` let each kernel
start while the previous one drains (see LinearLaunch for the condition).
"""

from __future__ import annotations

import torch

from flashrt_core import kernels
from flashrt_core.ops import _check_same_device, _check_shape, _check_tensor, _fail, _launch, _ptr, kernels_enabled
from flashrt_core.ops import expert_reference as twin
from flashrt_core.ops.expert_reference import AdaRmsNorm, AttentionLaunch, LinearLaunch, RmsNorm, pair_order
from flashrt_core.ops.reference import FP8, FP8_MAX

BF16 = torch.bfloat16
PARAM_DTYPES = (torch.float32, torch.bfloat16)
X_DTYPES = (torch.float32, torch.bfloat16)
W_DTYPES = (torch.bfloat16, FP8)
MAX_KERNEL_M = 64
ATTENTION_HEAD_DIM = 256  # the one head_dim decode_attention's kernel is built for

# must match cuda_src/expert_launchers.h
_PROLOGUE = {type(None): 0, RmsNorm: 1, AdaRmsNorm: 2}
_STORE, _GATED_RESIDUAL, _GELU_TANH_MUL, _QKV_ROPE = 0, 1, 2, 3


# --- weight preparation --------------------------------------------------------------


def pack_gate_up(gate_w: torch.Tensor, up_w: torch.Tensor) -> torch.Tensor:
    """[F, K] gate and up projections -> [2F, K] rows for linear_gelu_mul (F % 8 == 0)."""
    if gate_w.dim() != 2 or gate_w.shape != up_w.shape or gate_w.shape[0] % 8:
        raise ValueError(f"pack_gate_up: need two [F, K] weights with F % 8 == 0, got {tuple(gate_w.shape)} "
                         f"and {tuple(up_w.shape)}")
    both = torch.cat([gate_w, up_w])
    return both[pair_order(both.shape[0], both.device)]


def unpack_gate_up(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of pack_gate_up."""
    natural = torch.empty_like(packed)
    natural[pair_order(packed.shape[0], packed.device)] = packed
    return natural.chunk(2)


def pack_qkv_rope(q_w: torch.Tensor, k_w: torch.Tensor, v_w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q [Hq*D, K], k / v [Hkv*D, K] projections -> [(Hq + 2 Hkv) * D, K] rows for
    linear_qkv_rope: heads in q, k, v order, dims d and d + D/2 of each head paired."""
    if head_dim % 16 or any(w.dim() != 2 or w.shape[0] % head_dim for w in (q_w, k_w, v_w)):
        raise ValueError(f"pack_qkv_rope: head_dim must be a multiple of 16 dividing every weight's rows, got "
                         f"{head_dim} for {tuple(q_w.shape)}, {tuple(k_w.shape)}, {tuple(v_w.shape)}")
    if k_w.shape != v_w.shape or not q_w.shape[1] == k_w.shape[1]:
        raise ValueError("pack_qkv_rope: k and v must have one shape and q, k, v one input width")
    heads = torch.cat([q_w, k_w, v_w]).view(-1, head_dim, q_w.shape[1])
    return heads[:, pair_order(head_dim, heads.device)].reshape(-1, q_w.shape[1])


def unpack_qkv_rope(packed: torch.Tensor, head_dim: int, num_kv_heads: int):
    """Inverse of pack_qkv_rope: (q_w, k_w, v_w)."""
    heads = packed.view(-1, head_dim, packed.shape[1])
    natural = torch.empty_like(heads)
    natural[:, pair_order(head_dim, packed.device)] = heads
    kv = num_kv_heads * head_dim
    return natural.reshape(-1, packed.shape[1]).split([packed.shape[0] - 2 * kv, kv, kv])


def quantize_weight_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> (FP8 E4M3 [N, K], float32 scale [N]) with one scale per output
    row, amax(|row|) / 448 (1 for an all-zero row). Pack first, then quantize: the
    scales follow the rows."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight_fp8: need a 2-D float weight, got {w.dtype} {tuple(w.shape)}")
    wf = w.float()
    if not torch.isfinite(wf).all():
        raise ValueError("quantize_weight_fp8: the weight holds NaN or inf")
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


# --- validation ----------------------------------------------------------------------


def _check_rows(op: str, name: str, t, dtypes, rows: int, cols: int) -> None:
    """A [rows, cols] matrix whose rows may be strided (unit stride inside a row)."""
    _check_tensor(op, name, t, dtypes, ndim=2)
    _check_shape(op, name, t, (rows, cols))
    if t.stride(1) != 1:
        _fail(op, f"{name} must have unit stride along its last dim")


def _check_linear(op: str, x, w, w_scale, norm, **vectors) -> tuple[int, int, int, torch.dtype | None]:
    """x [M, K], W [N, K] (+ scale), norm and per-feature vectors; returns M, N, K and
    the one dtype shared by the vectors (None when there are none)."""
    _check_tensor(op, "x", x, X_DTYPES, ndim=2)
    _check_tensor(op, "w", w, W_DTYPES, ndim=2)
    m, k = x.shape
    n = w.shape[0]
    if m == 0 or k == 0 or n == 0:
        _fail(op, f"empty operand: x {tuple(x.shape)}, w {tuple(w.shape)}")
    if x.stride(1) != 1:
        _fail(op, "x must have unit stride along its last dim")
    _check_shape(op, "w", w, (n, k))
    if not w.is_contiguous():
        _fail(op, "w must be contiguous")
    if (w.dtype == FP8) != (w_scale is not None):
        _fail(op, "w_scale is required for, and only for, float8_e4m3fn weights")
    if w_scale is not None:
        _check_tensor(op, "w_scale", w_scale, (torch.float32,), ndim=1)
        _check_shape(op, "w_scale", w_scale, (n,))
    if norm is not None and type(norm) not in _PROLOGUE:
        _fail(op, f"norm must be None, RmsNorm or AdaRmsNorm, got {type(norm).__name__}")
    named = dict(vectors)
    if isinstance(norm, RmsNorm):
        named["norm.weight"] = norm.weight
    elif isinstance(norm, AdaRmsNorm):
        named["norm.scale"], named["norm.shift"] = norm.scale, norm.shift
    dtypes = set()
    for name, t in named.items():
        if t is None:
            continue
        _check_tensor(op, name, t, PARAM_DTYPES, ndim=1)
        expected = k if name.startswith("norm.") else n
        _check_shape(op, name, t, (expected,))
        dtypes.add(t.dtype)
    if len(dtypes) > 1:
        _fail(op, f"norm and per-feature vectors must share one dtype, got {sorted(map(str, dtypes))}")
    _check_same_device(op, x, w=w, w_scale=w_scale, **named)
    return m, n, k, (dtypes.pop() if dtypes else None)


def _check_rope(op: str, cos, sin, positions, cache_offset, m: int, head_dim: int) -> None:
    """cos / sin fp32 [max_pos, D/2], positions int32 [M], cache_offset int32 of one element."""
    for name, table in (("cos", cos), ("sin", sin)):
        _check_tensor(op, name, table, (torch.float32,), ndim=2)
        if table.shape[1] != head_dim // 2 or not table.is_contiguous():
            _fail(op, f"{name} must be contiguous [max_pos, {head_dim // 2}], got {tuple(table.shape)}")
    _check_shape(op, "sin", sin, cos.shape)
    _check_tensor(op, "positions", positions, (torch.int32,), ndim=1)
    _check_shape(op, "positions", positions, (m,))
    _check_tensor(op, "cache_offset", cache_offset, (torch.int32,))
    if cache_offset.numel() != 1:
        _fail(op, f"cache_offset must hold one element, got shape {tuple(cache_offset.shape)}")


# --- dispatch ------------------------------------------------------------------------


def _device_module(device: torch.device):
    """The extension module when the expert kernels run on `device`, else None."""
    if device.type != "cuda" or not kernels_enabled():
        return None
    module = kernels.module()
    if not hasattr(module, "small_m_linear") or not kernels.device_supported(device.index):
        return None
    return module


def _kernel_module(*tensors: torch.Tensor | None):
    """The extension module when these tensors can take the kernel path, else None."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    module = _device_module(device)
    if module is None or any(t.device != device or t.data_ptr() % 16 for t in present):
        return None
    return module


def attention_runs_on_kernel(head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether decode_attention takes its kernel for q / k / v of `dtype` and `head_dim` on
    `device` (given 16-byte aligned tensors in its layouts; otherwise it runs its twin)."""
    return dtype == BF16 and head_dim == ATTENTION_HEAD_DIM and _device_module(device) is not None


def layer_runs_on_kernels(rows: int, width: int, mlp_dim: int, num_heads: int, num_kv_heads: int,
                          head_dim: int, device: torch.device) -> bool:
    """Whether every op of an expert layer over `rows` tokens (bf16 weights, norm
    prologues) takes its kernel on `device`. A runtime captured as a CUDA graph needs
    that: the twins read the KV-cache offset on the host, which a capture forbids."""
    module = _device_module(device)
    if module is None or rows > MAX_KERNEL_M or head_dim != ATTENTION_HEAD_DIM:
        return False
    bf16 = int(kernels.dtype_code(torch.bfloat16))
    ada = _PROLOGUE[AdaRmsNorm]
    gemms = (((num_heads + 2 * num_kv_heads) * head_dim, width, ada), (width, num_heads * head_dim, 0),
             (2 * mlp_dim, width, ada), (width, mlp_dim, 0))
    return all(module.small_m_linear_supported(m=rows, n=n, k=k, w_dtype=bf16, prologue=prologue)
               for n, k, prologue in gemms)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two tensors intersect."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + ((a.shape[0] - 1) * a.stride(0) + a.shape[1]) * a.element_size()
    b1 = b0 + ((b.shape[0] - 1) * b.stride(0) + b.shape[1]) * b.element_size()
    return a0 < b1 and b0 < a1


def _row_stride(t: torch.Tensor) -> int:
    """Elements between rows (a single row may report any stride)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _linear_module(x, w, norm, m, n, k, *tensors):
    module = _kernel_module(x, w, *tensors, *_norm_vectors(norm))
    if module is None or m > MAX_KERNEL_M or (_row_stride(x) * x.element_size()) % 16:
        return None
    code = int(kernels.dtype_code(w.dtype))
    supported = module.small_m_linear_supported(m=m, n=n, k=k, w_dtype=code, prologue=_PROLOGUE[type(norm)])
    return module if supported else None


def _run_linear(module, x, w, w_scale, norm, param_dtype, epilogue, launch, **kwargs) -> None:
    m, k = x.shape
    launch = launch or LinearLaunch()
    args = dict(x=x.data_ptr(), x_row_stride=_row_stride(x), x_dtype=int(kernels.dtype_code(x.dtype)),
                w=w.data_ptr(), w_dtype=int(kernels.dtype_code(w.dtype)), w_scale=_ptr(w_scale), m=m,
                n=w.shape[0], k=k, prologue=_PROLOGUE[type(norm)], norm_weight=0, norm_shift=0, eps=1e-6,
                param_dtype=int(kernels.dtype_code(param_dtype or torch.float32)), epilogue=epilogue, out=0,
                out_row_stride=0, bias=0, residual=0, residual_row_stride=0, residual_dtype=0, gate=0, q_out=0,
                k_cache=0, v_cache=0, cos=0, sin=0, positions=0, cache_offset=0, num_q_heads=0, num_kv_heads=0,
                head_dim=0, max_pos=0, cache_rows=0, q_scale=1.0, split_k=launch.split_k,
                max_groups=launch.max_groups, pdl=launch.pdl)
    if isinstance(norm, RmsNorm):
        args.update(norm_weight=norm.weight.data_ptr(), eps=norm.eps)
    elif isinstance(norm, AdaRmsNorm):
        args.update(norm_weight=norm.scale.data_ptr(), norm_shift=norm.shift.data_ptr(), eps=norm.eps)
    args.update(kwargs)
    _launch(module.small_m_linear, x.device, **args)


def _norm_vectors(norm) -> tuple[torch.Tensor, ...]:
    if isinstance(norm, RmsNorm):
        return (norm.weight,)
    if isinstance(norm, AdaRmsNorm):
        return (norm.scale, norm.shift)
    return ()


# --- ops -----------------------------------------------------------------------------


def linear(x, w, *, w_scale=None, norm=None, bias=None, out=None, launch: LinearLaunch | None = None):
    """out [M, N] bf16 = prologue(x) @ W^T (* w_scale) (+ bias). Returns out."""
    op = "expert.linear"
    m, n, k, param_dtype = _check_linear(op, x, w, w_scale, norm, bias=bias)
    if out is not None:
        _check_rows(op, "out", out, (BF16,), m, n)
    module = _linear_module(x, w, norm, m, n, k, w_scale, bias, out)
    if module is None:
        return twin.linear(x, w, w_scale=w_scale, norm=norm, bias=bias, out=out)
    if out is None:
        out = torch.empty(m, n, dtype=BF16, device=x.device)
    _run_linear(module, x, w, w_scale, norm, param_dtype, _STORE, launch, out=out.data_ptr(),
                out_row_stride=_row_stride(out), bias=_ptr(bias))
    return out


def linear_gated_residual(x, w, residual, *, gate=None, w_scale=None, norm=None,
                          launch: LinearLaunch | None = None):
    """residual[m, n] += gate[n] * (prologue(x) @ W^T)[m, n] in place (gate None: 1);
    residual bf16 or fp32. Returns residual."""
    op = "expert.linear_gated_residual"
    m, n, k, param_dtype = _check_linear(op, x, w, w_scale, norm, gate=gate)
    _check_rows(op, "residual", residual, (BF16, torch.float32), m, n)
    _check_same_device(op, x, residual=residual)
    if _overlap(x, residual):
        _fail(op, "x and residual must not share memory (residual is written while x is read)")
    module = _linear_module(x, w, norm, m, n, k, w_scale, gate, residual)
    if module is None:
        return twin.linear_gated_residual(x, w, residual, gate=gate, w_scale=w_scale, norm=norm)
    _run_linear(module, x, w, w_scale, norm, param_dtype, _GATED_RESIDUAL, launch, residual=residual.data_ptr(),
                residual_row_stride=_row_stride(residual), residual_dtype=int(kernels.dtype_code(residual.dtype)),
                gate=_ptr(gate))
    return residual


def linear_gelu_mul(x, w, *, w_scale=None, norm=None, out=None, launch: LinearLaunch | None = None):
    """out [M, F] bf16 = gelu_tanh(gate) * up, with w = pack_gate_up(gate_w, up_w)
    [2F, K] (FP8: quantize the packed weight). Returns out."""
    op = "expert.linear_gelu_mul"
    m, n, k, param_dtype = _check_linear(op, x, w, w_scale, norm)
    if n % 16:
        _fail(op, f"w must have a multiple of 16 rows (packed gate | up), got {n}")
    if out is not None:
        _check_rows(op, "out", out, (BF16,), m, n // 2)
    module = _linear_module(x, w, norm, m, n, k, w_scale, out)
    if module is None:
        return twin.linear_gelu_mul(x, w, w_scale=w_scale, norm=norm, out=out)
    if out is None:
        out = torch.empty(m, n // 2, dtype=BF16, device=x.device)
    _run_linear(module, x, w, w_scale, norm, param_dtype, _GELU_TANH_MUL, launch, out=out.data_ptr(),
                out_row_stride=_row_stride(out))
    return out


def linear_qkv_rope(x, w, *, cos, sin, positions, k_cache, v_cache, cache_offset, q_out=None, q_scale=1.0,
                    w_scale=None, norm=None, launch: LinearLaunch | None = None):
    """Fused QKV projection, w = pack_qkv_rope(q_w, k_w, v_w, D) [(Hq + 2 Hkv) * D, K]:
    q = RoPE(x W_q^T) * q_scale -> q_out [M, Hq, D] bf16; RoPE(x W_k^T) and x W_v^T ->
    k_cache / v_cache [S_max, Hkv, D] bf16 at rows cache_offset + m. RoPE is rotate-half
    with cos / sin float32 [max_pos, D/2] at positions (int32 [M]); cache_offset is an
    int32 device tensor of one element, so one captured graph serves any offset. On
    the kernel path a position outside the table gives NaN and cache rows past S_max are
    not written. Returns q_out."""
    op = "expert.linear_qkv_rope"
    m, n, k, param_dtype = _check_linear(op, x, w, w_scale, norm)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(op, name, cache, (BF16,), ndim=3)
        if not cache.is_contiguous() or cache.device != x.device:
            _fail(op, f"{name} must be contiguous and on {x.device}")
    _check_shape(op, "v_cache", v_cache, k_cache.shape)
    cache_rows, num_kv_heads, head_dim = k_cache.shape
    if head_dim % 16 or n % head_dim or n // head_dim <= 2 * num_kv_heads:
        _fail(op, f"w has {n} rows: not (Hq + 2 * {num_kv_heads}) heads of {head_dim} (head_dim % 16 == 0)")
    num_q_heads = n // head_dim - 2 * num_kv_heads
    _check_rope(op, cos, sin, positions, cache_offset, m, head_dim)
    if q_out is not None:
        _check_tensor(op, "q_out", q_out, (BF16,), ndim=3)
        _check_shape(op, "q_out", q_out, (m, num_q_heads, head_dim))
        if not q_out.is_contiguous():
            _fail(op, "q_out must be contiguous")
    _check_same_device(op, x, cos=cos, sin=sin, positions=positions, cache_offset=cache_offset, q_out=q_out)
    module = _linear_module(x, w, norm, m, n, k, w_scale, k_cache, v_cache, cos, sin, positions, cache_offset,
                            q_out)
    if module is None:
        return twin.linear_qkv_rope(x, w, cos=cos, sin=sin, positions=positions, k_cache=k_cache, v_cache=v_cache,
                                    cache_offset=cache_offset, q_out=q_out, q_scale=q_scale, w_scale=w_scale,
                                    norm=norm)
    if q_out is None:
        q_out = torch.empty(m, num_q_heads, head_dim, dtype=BF16, device=x.device)
    _run_linear(module, x, w, w_scale, norm, param_dtype, _QKV_ROPE, launch, q_out=q_out.data_ptr(),
                k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(),
                positions=positions.data_ptr(), cache_offset=cache_offset.data_ptr(), num_q_heads=num_q_heads,
                num_kv_heads=num_kv_heads, head_dim=head_dim, max_pos=cos.shape[0], cache_rows=cache_rows,
                q_scale=float(q_scale))
    return q_out


def decode_attention(q, k, v, *, bias=None, scale=None, out=None, launch: AttentionLaunch | None = None,
                     stable_keys: int = 0):
    """out [M, Hq, D] bf16 = softmax(q k^T * scale + bias) v per query head; q [M, Hq, D]
    bf16, k / v [S, Hkv, D] bf16 (e.g. the first S rows of a KV cache), query head h
    reading KV head h // (Hq / Hkv); bias float32 [S] (shared) or [M, S] (additive, -inf
    masks); scale defaults to D^-0.5. A row whose keys are all masked is zero. Returns out.

    stable_keys: keys [0, stable_keys) of k / v and the bias are written by no kernel that
    may still be running (a KV cache's older rows); with launch.pdl they are loaded
    before waiting for the previous kernel, which leaves only q and the newer keys on the
    critical path. It does not change the result."""
    op = "expert.decode_attention"
    _check_tensor(op, "q", q, (BF16,), ndim=3)
    _check_tensor(op, "k", k, (BF16,), ndim=3)
    _check_shape(op, "v", v, k.shape)
    _check_tensor(op, "v", v, (BF16,), ndim=3)
    m, num_q_heads, head_dim = q.shape
    keys, num_kv_heads, _ = k.shape
    if m == 0 or keys == 0 or k.shape[2] != head_dim or num_kv_heads == 0 or num_q_heads % num_kv_heads:
        _fail(op, f"q {tuple(q.shape)} and k {tuple(k.shape)} do not fit (Hq % Hkv == 0, same D, non-empty)")
    if bias is not None:
        _check_tensor(op, "bias", bias, (torch.float32,))
        if tuple(bias.shape) not in ((keys,), (m, keys)) or bias.stride(-1) != 1:
            _fail(op, f"bias must be [{keys}] or [{m}, {keys}] with unit last stride, got {tuple(bias.shape)}")
    if out is not None:
        _check_tensor(op, "out", out, (BF16,), ndim=3)
        _check_shape(op, "out", out, q.shape)
    _check_same_device(op, q, k=k, v=v, bias=bias, out=out)
    scale = head_dim**-0.5 if scale is None else float(scale)
    # the device and shape part of the choice is the runtime's too (attention_runs_on_kernel)
    module = _kernel_module(q, k, v, bias, out) if attention_runs_on_kernel(head_dim, q.dtype, q.device) else None
    kv_stride = k.stride(0) if keys > 1 else num_kv_heads * head_dim
    kv_layout_ok = all(t.stride(2) == 1 and (t.stride(1) == head_dim or num_kv_heads == 1) for t in (k, v))
    kv_layout_ok = kv_layout_ok and kv_stride % 8 == 0 and (keys == 1 or v.stride(0) == kv_stride)
    if (module is None or not q.is_contiguous() or not kv_layout_ok
            or (out is not None and not out.is_contiguous())):
        return twin.decode_attention(q, k, v, bias=bias, scale=scale, out=out)
    if out is None:
        out = torch.empty_like(q)
    launch = launch or AttentionLaunch()
    _launch(module.expert_decode_attention, q.device, q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
            bias=_ptr(bias), out=out.data_ptr(), tokens=m, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, keys=keys, kv_row_stride=kv_stride,
            bias_row_stride=0 if bias is None or bias.dim() == 1 else _row_stride(bias), scale=scale,
            splits=launch.splits, rows_per_block=launch.rows_per_block, pdl=launch.pdl,
            stable_keys=max(0, min(int(stable_keys), keys)))
    return out


def velocity_euler_embed(x_t, *, res=None, norm=None, w_out=None, b_out=None, dt=0.0, w_in=None, b_in=None,
                         out=None, launch: LinearLaunch | None = None):
    """The flow-matching step outside the expert layers (cuda_src/velocity_euler_embed.cu):

        with res:   x_t += dt * (norm(res) @ w_out^T + b_out)     norm rounded to res's dtype
        with w_in:  out  = x_t @ w_in^T + b_in                    after that update

    x_t [H, A] float32, updated in place; res / out [H, D] with unit stride along D (they
    may be the same rows: res is read before out is written); norm RmsNorm or AdaRmsNorm
    with float32 vectors [D]; w_out [A, D], b_out [A], w_in [D, A], b_in [D] float32.
    One launch on CUDA (bf16 res / out, H <= 64, D % 128 == 0 and <= 1024, A % 4 == 0 and
    <= 32); launch.pdl lets it load the weights while the previous kernel drains.
    Returns x_t."""
    op = "expert.velocity_euler_embed"
    _check_tensor(op, "x_t", x_t, (torch.float32,), ndim=2)
    if not x_t.is_contiguous():
        _fail(op, "x_t must be contiguous")
    rows, actions = x_t.shape
    if res is None and w_in is None:
        _fail(op, "nothing to do: give res (velocity and Euler step) and / or w_in (embedding)")
    f32 = (torch.float32,)
    dim = None
    vectors = _norm_vectors(norm) if res is not None else ()  # RMS: (weight,); adaRMS: (scale, shift)
    if res is not None:
        _check_tensor(op, "res", res, X_DTYPES, ndim=2)
        dim = res.shape[1]
        _check_rows(op, "res", res, X_DTYPES, rows, dim)
        if type(norm) not in (RmsNorm, AdaRmsNorm):
            _fail(op, f"res needs norm RmsNorm or AdaRmsNorm, got {type(norm).__name__}")
        for t in vectors:
            _check_tensor(op, "norm vector", t, f32, ndim=1)
            _check_shape(op, "norm vector", t, (dim,))
        _check_tensor(op, "w_out", w_out, f32, ndim=2)
        _check_shape(op, "w_out", w_out, (actions, dim))
        _check_tensor(op, "b_out", b_out, f32, ndim=1)
        _check_shape(op, "b_out", b_out, (actions,))
    if w_in is not None:
        _check_tensor(op, "w_in", w_in, f32, ndim=2)
        dim = w_in.shape[0] if dim is None else dim
        _check_shape(op, "w_in", w_in, (dim, actions))
        _check_tensor(op, "b_in", b_in, f32, ndim=1)
        _check_shape(op, "b_in", b_in, (dim,))
        if out is None:
            _fail(op, "the embedding needs out")
        _check_rows(op, "out", out, X_DTYPES, rows, dim)
    norm_weight, norm_shift = (*vectors, None, None)[:2]
    _check_same_device(op, x_t, res=res, norm_weight=norm_weight, norm_shift=norm_shift, w_out=w_out, b_out=b_out,
                       w_in=w_in, b_in=b_in, out=out)
    module = _kernel_module(x_t, res, *vectors, w_out, b_out, w_in, b_in, out)
    kernel = (module is not None and hasattr(module, "velocity_euler_embed")
              and all(t is None or t.dtype == BF16 for t in (res, out))
              and all(t is None or t.is_contiguous() for t in (*vectors, w_out, b_out, w_in, b_in))
              and module.velocity_euler_embed_supported(rows=rows, dim=dim, actions=actions))
    if not kernel:
        return twin.velocity_euler_embed(x_t, res=res, norm=norm, w_out=w_out, b_out=b_out, dt=dt, w_in=w_in,
                                         b_in=b_in, out=out)
    launch = launch or LinearLaunch()
    _launch(module.velocity_euler_embed, x_t.device, res=_ptr(res), res_row_stride=0 if res is None else _row_stride(res),
            prologue=_PROLOGUE[type(norm)] if res is not None else 0, norm_weight=_ptr(norm_weight),
            norm_shift=_ptr(norm_shift), eps=float(norm.eps) if res is not None else 0.0, w_out=_ptr(w_out),
            b_out=_ptr(b_out), dt=float(dt), x_t=x_t.data_ptr(), w_in=_ptr(w_in), b_in=_ptr(b_in), out=_ptr(out),
            out_row_stride=0 if out is None else _row_stride(out), rows=rows, dim=dim, actions=actions,
            pdl=launch.pdl)
    return x_t


__all__ = [
    "AdaRmsNorm",
    "AttentionLaunch",
    "LinearLaunch",
    "RmsNorm",
    "decode_attention",
    "linear",
    "linear_gated_residual",
    "linear_gelu_mul",
    "linear_qkv_rope",
    "pack_gate_up",
    "pack_qkv_rope",
    "quantize_weight_fp8",
    "unpack_gate_up",
    "unpack_qkv_rope",
    "velocity_euler_embed",
]
