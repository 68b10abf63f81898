"""PyTorch twins of the CUDA kernels: same signatures and semantics as
`flashrt_core.ops`, all arithmetic in fp32 (fp64 stays fp64). They run wherever
torch runs (the CPU path of the engine) and are the oracle of the kernels' GPU tests.

They do not validate arguments; call them through `flashrt_core.ops`, which does.

Conventions shared with the kernels:
- Output dtype: `out.dtype` when `out` is given, else float8_e4m3fn when `out_scale`
  is given, else the input dtype.
- FP8 output: q = saturate_e4m3(y * (1 / scale)) with `scale` a float32 tensor of one
  element; 1/scale and the product in fp32, round to nearest even, |values| beyond 448
  saturate to +-448, NaN stays NaN.
- In-place ops (residual updates, rope, euler_step) write the input's dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def _math(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def output_dtype(x_dtype: torch.dtype, out: torch.Tensor | None, out_scale: torch.Tensor | None) -> torch.dtype:
    if out is not None:
        return out.dtype
    return FP8 if out_scale is not None else x_dtype


def _emit(y: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None, out_scale: torch.Tensor | None):
    y = _to_e4m3(y, out_scale) if dtype == FP8 else y.to(dtype)
    if out is None:
        return y
    out.copy_(y.view(out.shape))
    return out


def _to_e4m3(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    inv_scale = 1.0 / scale.reshape(()).float()
    return (y.float() * inv_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _normalize_rms(h: torch.Tensor, eps: float) -> torch.Tensor:
    return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)


def _normalize_layer(h: torch.Tensor, eps: float) -> torch.Tensor:
    mean = h.mean(-1, keepdim=True)
    centered = h - mean
    return centered * torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)


def _update_residual(x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """residual <- residual + x [* gate] in residual's dtype; returns the new value in
    math precision (what the stored residual holds, rounding included)."""
    add = _math(x) if gate is None else _math(x) * _math(gate)
    residual.copy_((_math(residual) + add).to(residual.dtype))
    return _math(residual)


def _modulate(y, weight=None, weight_offset=0.0, scale=None, shift=None):
    if weight is not None:
        y = y * (weight_offset + _math(weight))
    if scale is not None:
        y = y * (1.0 + _math(scale))
    if shift is not None:
        y = y + _math(shift)
    return y


def rms_norm(x, weight=None, eps=1e-6, out=None, out_scale=None):
    """y = x * rsqrt(mean(x^2) + eps) * (1 + weight)  (Gemma; weight None: no affine)."""
    y = _modulate(_normalize_rms(_math(x), eps), weight, 1.0)
    return _emit(y, output_dtype(x.dtype, out, out_scale), out, out_scale)


def add_rms_norm(x, residual, weight=None, eps=1e-6, out=None, out_scale=None):
    """residual <- residual + x (in place); y = rms_norm(residual, weight)."""
    h = _update_residual(x, residual, None)
    y = _modulate(_normalize_rms(h, eps), weight, 1.0)
    return _emit(y, output_dtype(x.dtype, out, out_scale), out, out_scale)


def ada_rms_norm(x, scale, shift, eps=1e-6, out=None, out_scale=None):
    """y = rms(x) * (1 + scale) + shift; scale/shift [D] broadcast over rows."""
    y = _modulate(_normalize_rms(_math(x), eps), scale=scale, shift=shift)
    return _emit(y, output_dtype(x.dtype, out, out_scale), out, out_scale)


def gated_add_ada_rms_norm(x, residual, gate, scale, shift, eps=1e-6, out=None, out_scale=None):
    """residual <- residual + x * gate (in place); y = rms(residual) * (1 + scale) + shift."""
    h = _update_residual(x, residual, gate)
    y = _modulate(_normalize_rms(h, eps), scale=scale, shift=shift)
    return _emit(y, output_dtype(x.dtype, out, out_scale), out, out_scale)


def gated_add(x, residual, gate):
    """residual <- residual + x * gate (in place); returns residual."""
    _update_residual(x, residual, gate)
    return residual


def layer_norm(x, weight, bias, eps=1e-6, out=None, out_scale=None):
    """y = (x - mean) * rsqrt(var + eps) * weight + bias (biased variance)."""
    y = _modulate(_normalize_layer(_math(x), eps), weight, 0.0, shift=bias)
    return _emit(y, output_dtype(x.dtype, out, out_scale), out, out_scale)


def add_layer_norm(x, residual, weight, bias, eps=1e-6, out=None, out_scale=None):
    """residual <- residual + x (in place); y = layer_norm(residual)."""
    h = _update_residual(x, residual, None)
    y = _modulate(_normalize_layer(h, eps), weight, 0.0, shift=bias)
    return _emit(y, output_dtype(x.dtype, out, out_scale), out, out_scale)


def gelu_tanh(x, out=None, out_scale=None):
    """GELU, tanh approximation."""
    y = F.gelu(_math(x), approximate="tanh")
    return _emit(y, output_dtype(x.dtype, out, out_scale), out, out_scale)


def gelu_tanh_mul(gate_up, out=None, out_scale=None):
    """gate_up [..., 2F] (gate | up, one fused GEMM's output) -> gelu_tanh(gate) * up [..., F]."""
    gate, up = _math(gate_up).chunk(2, dim=-1)
    y = F.gelu(gate, approximate="tanh") * up
    return _emit(y, output_dtype(gate_up.dtype, out, out_scale), out, out_scale)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [T, H, Dh] with cos/sin [T, 1, Dh/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _tables(cos, sin, positions):
    idx = positions.long()
    return _math(cos)[idx][:, None, :], _math(sin)[idx][:, None, :]


def rope(x, cos, sin, positions):
    """In-place RoPE of x [T, H, Dh] (rotate-half) at `positions` [T]; cos/sin are fp32
    tables [max_pos, Dh/2]. Returns x."""
    c, s = _tables(cos, sin, positions)
    x.copy_(_rotate(_math(x), c, s).to(x.dtype))
    return x


def qkv_rope_split(qkv, cos, sin, positions, k_cache, v_cache, cache_offset=0, q_scale=1.0, out=None):
    """Split qkv [T, (Hq + 2 Hkv) * Dh] into q (roped, times q_scale) -> returned / `out`
    [T, Hq, Dh], and k (roped), v -> k_cache / v_cache [S_max, Hkv, Dh] rows
    cache_offset .. cache_offset + T. Head counts come from the cache shape."""
    tokens = qkv.shape[0]
    num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    heads = _math(qkv).view(tokens, -1, head_dim)
    num_q_heads = heads.shape[1] - 2 * num_kv_heads
    q, k, v = heads.split([num_q_heads, num_kv_heads, num_kv_heads], dim=1)
    c, s = _tables(cos, sin, positions)
    rows = slice(cache_offset, cache_offset + tokens)
    k_cache[rows] = _rotate(k, c, s).to(k_cache.dtype)
    v_cache[rows] = v.to(v_cache.dtype)
    return _emit(_rotate(q, c, s) * q_scale, qkv.dtype if out is None else out.dtype, out, None)


def quantize_fp8(x, scale, out=None):
    """float8_e4m3fn of x * (1 / scale), saturating."""
    return _emit(_math(x), FP8, out, scale)


def absmax(x, out=None, accumulate=False):
    """max |x| as a float32 tensor [1] (NaN propagates); with accumulate, the max of
    that and the value already in `out` (running calibration)."""
    value = _math(x).abs().amax().float().reshape(1) if x.numel() else torch.zeros(1, device=x.device)
    if out is None:
        return value
    out.copy_(torch.maximum(out, value) if accumulate else value)
    return out


def euler_step(x, v, dt):
    """x <- x + dt * v in place (flow-matching Euler step). Returns x."""
    x.copy_((_math(x) + dt * _math(v)).to(x.dtype))
    return x


@functools.lru_cache(maxsize=None)
def pixel_values(device=None) -> torch.Tensor:
    """fp32 value of each uint8 pixel: the double x / 255 * 2 - 1 rounded once to fp32.
    A table, so the result never depends on how a backend divides (torch may multiply
    by a rounded reciprocal); the kernel computes the same double expression. Made once
    per device (read-only): a CUDA graph capture could not copy it from the host."""
    return torch.tensor([v / 255.0 * 2.0 - 1.0 for v in range(256)], dtype=torch.float64).float().to(device)


def images_to_patches(images, patch=14, dtype=torch.bfloat16, out=None):
    """uint8 images [V, H, W, C] -> patch rows [V * (H/p) * (W/p), C * p * p] in the
    conv weight's (c, kh, kw) order, value x / 255 * 2 - 1 (`pixel_values`): SigLIP's
    patch embedding becomes one GEMM and the preprocessing runs on the GPU."""
    views, height, width, channels = images.shape
    gh, gw = height // patch, width // patch
    x = pixel_values(images.device)[images.long()]
    x = x.view(views, gh, patch, gw, patch, channels).permute(0, 1, 3, 5, 2, 4)
    y = x.reshape(views * gh * gw, channels * patch * patch)
    return _emit(y, dtype if out is None else out.dtype, out, None)


def _attention(qf, kf, vf, bias, scale):
    """softmax(q k^T * scale + bias) v in math precision; q [T, Hq, Dh], k/v [S, Hkv, Dh]."""
    group = qf.shape[1] // kf.shape[1]
    qh = qf.permute(1, 0, 2)  # [Hq, T, Dh]
    kh = kf.permute(1, 0, 2).repeat_interleave(group, dim=0)  # [Hq, S, Dh]
    vh = vf.permute(1, 0, 2).repeat_interleave(group, dim=0)
    scores = qh @ kh.transpose(1, 2) * scale
    if bias is not None:
        scores = scores + _math(bias)
    return (torch.softmax(scores, dim=-1) @ vh).permute(1, 0, 2)


def decode_attention(q, k, v, bias=None, scale=None, out=None, workspace=None):
    """softmax(q k^T * scale + bias) v per query head; q [T, Hq, Dh], k/v [S, Hkv, Dh]
    (query head h reads KV head h // (Hq / Hkv)); bias fp32 [T, S] or [S] (additive,
    -inf masks); scale defaults to Dh^-0.5. `workspace` is the kernel's; unused here."""
    del workspace
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    y = _attention(_math(q), _math(k), _math(v), bias, scale)
    return _emit(y, q.dtype if out is None else out.dtype, out, None)


def qkv_rope_attention(qkv, cos, sin, positions, k_cache, v_cache, cache_offset, bias=None, scale=None, out=None,
                       workspace=None):
    """The expert step's attention from the fused QKV projection in one op: as
    qkv_rope_split (k, v rows written to the caches at cache_offset..) followed by
    decode_attention of the rotated q against cache rows 0 .. cache_offset + T, except
    that q stays in math precision (never rounded to the activation dtype)."""
    del workspace
    qkv_rope_split(qkv, cos, sin, positions, k_cache, v_cache, cache_offset)
    tokens, head_dim = qkv.shape[0], k_cache.shape[2]
    heads = _math(qkv).view(tokens, -1, head_dim)
    q = heads[:, : heads.shape[1] - 2 * k_cache.shape[1]]
    q = _rotate(q, *_tables(cos, sin, positions))
    keys = cache_offset + tokens
    scale = head_dim**-0.5 if scale is None else scale
    y = _attention(q, _math(k_cache[:keys]), _math(v_cache[:keys]), bias, scale)
    return _emit(y, qkv.dtype if out is None else out.dtype, out, None)


__all__ = [
    "FP8",
    "FP8_MAX",
    "add_layer_norm",
    "add_rms_norm",
    "absmax",
    "ada_rms_norm",
    "decode_attention",
    "euler_step",
    "gated_add",
    "gated_add_ada_rms_norm",
    "gelu_tanh",
    "gelu_tanh_mul",
    "images_to_patches",
    "layer_norm",
    "output_dtype",
    "pixel_values",
    "qkv_rope_attention",
    "qkv_rope_split",
    "quantize_fp8",
    "rms_norm",
    "rope",
]
