"""PyTorch twins of the action-expert kernels (`flashrt_core.ops.expert`): same
signatures, same semantics, fp32 arithmetic. They run wherever torch runs and are the
oracle of the kernels' GPU tests. They do not validate; call them through
`flashrt_core.ops.expert`, which does.

Semantics shared with the kernels (cuda_src/small_m_linear.cu, decode_attention.cu):
- Prologue: x (bf16 or fp32) -> fp32 -> optional RMS / adaRMS norm -> rounded to bf16.
  That bf16 tensor is what the dot products see (as cuBLAS would in the unfused path).
- acc = prologue(x) @ W^T in fp32, W widened exactly from bf16 or FP8 E4M3; FP8 weights
  then scale acc by their per-row float32 scale.
- Epilogues take acc in fp32 and round once, to the destination dtype.
- W rows of the GeGLU and QKV epilogues are in packed order (`expert.pack_gate_up`,
  `expert.pack_qkv_rope`); the twins unpack the accumulator columns.
- Attention: softmax(q k^T * scale + bias) v in fp32; a query row whose keys are all
  masked (-inf) is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashrt_core.ops import reference


@dataclass(frozen=True)
class RmsNorm:
    """Prologue y = x * rsqrt(mean(x^2) + eps) * (1 + weight), weight [K]."""

    weight: torch.Tensor
    eps: float = 1e-6


@dataclass(frozen=True)
class AdaRmsNorm:
    """Prologue y = x * rsqrt(mean(x^2) + eps) * (1 + scale) + shift, scale/shift [K]
    (Pi0.5 expert; the step's modulation, shared by all tokens)."""

    scale: torch.Tensor
    shift: torch.Tensor
    eps: float = 1e-6


@dataclass(frozen=True)
class LinearLaunch:
    """Launch shape of small_m_linear (kernel path only; 0 = automatic).

    split_k: blocks splitting K (a thread-block cluster, 1..8). max_groups: cap on
    concurrent block groups. pdl: programmatic dependent launch; the kernel then reads
    W and w_scale before the previous kernel in the stream has finished, so enable it
    only where that kernel does not write them (the steady-state expert loop)."""

    split_k: int = 0
    max_groups: int = 0
    pdl: bool = False


@dataclass(frozen=True)
class AttentionLaunch:
    """Launch shape of decode_attention (kernel path only; 0 = automatic): key splits
    (cluster size, up to 16 on H100), query rows per block (16, 32, 64), PDL."""

    splits: int = 0
    rows_per_block: int = 0
    pdl: bool = False


def pair_order(rows: int, device=None) -> torch.Tensor:
    """Packed row p holds natural row order[p]: blocks of 16 packed rows pair natural
    rows [8t, 8t + 8) with [rows/2 + 8t, rows/2 + 8t + 8), so that row j and its
    partner j + rows/2 land 8 rows apart, in one lane of the kernel's MMA tile.
    GeGLU: gate | up rows (pack_gate_up); RoPE: dims d | d + D/2 of a head. Built on
    `device`: no host-to-device copy, so a twin can run inside a CUDA graph capture."""
    half = torch.arange(rows // 2, device=device).view(-1, 8)
    return torch.stack([half, half + rows // 2], dim=1).flatten()


def unpack_columns(acc: torch.Tensor, rows: int) -> torch.Tensor:
    """Last-dim groups of `rows` columns in pair_order(rows) -> natural order."""
    packed = acc.reshape(*acc.shape[:-1], -1, rows)
    natural = torch.empty_like(packed)
    natural[..., pair_order(rows, acc.device)] = packed
    return natural.flatten(-2)


def prologue(x: torch.Tensor, norm: RmsNorm | AdaRmsNorm | None) -> torch.Tensor:
    """The bf16 activations the dot products see."""
    xf = x.float()
    if isinstance(norm, RmsNorm):
        xf = reference.rms_norm(xf, norm.weight, norm.eps)
    elif isinstance(norm, AdaRmsNorm):
        xf = reference.ada_rms_norm(xf, norm.scale, norm.shift, norm.eps)
    return xf.to(torch.bfloat16)


def accumulate(x, w, w_scale=None, norm=None) -> torch.Tensor:
    """fp32 acc [M, N] = prologue(x) @ W^T (* w_scale)."""
    acc = prologue(x, norm).float() @ w.float().t()
    return acc if w_scale is None else acc * w_scale.float()


def _write(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return y.to(torch.bfloat16)
    out.copy_(y)
    return out


def linear(x, w, *, w_scale=None, norm=None, bias=None, out=None, launch=None):
    """out [M, N] bf16 = prologue(x) @ W^T (* w_scale) (+ bias)."""
    del launch
    acc = accumulate(x, w, w_scale, norm)
    return _write(acc if bias is None else acc + bias.float(), out)


def linear_gated_residual(x, w, residual, *, gate=None, w_scale=None, norm=None, launch=None):
    """residual[m, n] += gate[n] * acc[m, n] in place (gate None: 1); returns residual."""
    del launch
    return reference.gated_add(accumulate(x, w, w_scale, norm), residual, gate)


def linear_gelu_mul(x, w, *, w_scale=None, norm=None, out=None, launch=None):
    """out [M, F] bf16 = gelu_tanh(gate) * up with W = pack_gate_up(gate_w, up_w)."""
    del launch
    gate_up = unpack_columns(accumulate(x, w, w_scale, norm), w.shape[0])
    if out is None:
        out = torch.empty(gate_up.shape[0], w.shape[0] // 2, dtype=torch.bfloat16, device=x.device)
    return reference.gelu_tanh_mul(gate_up, out=out)


def linear_qkv_rope(x, w, *, cos, sin, positions, k_cache, v_cache, cache_offset, q_out=None, q_scale=1.0,
                    w_scale=None, norm=None, launch=None):
    """Fused QKV projection with W = pack_qkv_rope(...): RoPE'd q (times q_scale) ->
    q_out [M, Hq, D]; RoPE'd k and v -> k_cache / v_cache rows cache_offset + m.
    cache_offset is an int32 device tensor of one element (read on the host here)."""
    del launch
    head_dim = k_cache.shape[-1]
    acc = unpack_columns(accumulate(x, w, w_scale, norm), head_dim)
    if q_out is None:
        q_out = torch.empty(acc.shape[0], acc.shape[1] // head_dim - 2 * k_cache.shape[1], head_dim,
                            dtype=torch.bfloat16, device=x.device)
    return reference.qkv_rope_split(acc, cos, sin, positions, k_cache, v_cache, cache_offset=int(cache_offset),
                                    q_scale=q_scale, out=q_out)


def decode_attention(q, k, v, *, bias=None, scale=None, out=None, launch=None):
    """out [M, Hq, D] = softmax(q k^T * scale + bias) v; k / v [S, Hkv, D]; bias fp32
    [S] or [M, S]; scale defaults to D^-0.5. Rows with every key masked are zero."""
    del launch
    y = reference.decode_attention(q.float(), k.float(), v.float(), bias, scale)
    if bias is not None:
        dead = torch.isneginf(bias).all(dim=-1)  # [] or [M]
        y = torch.where(dead.reshape(-1, 1, 1), torch.zeros_like(y), y)
    return _write(y, out)


def velocity_euler_embed(x_t, *, res=None, norm=None, w_out=None, b_out=None, dt=0.0, w_in=None, b_in=None,
                         out=None, launch=None):
    """The flow-matching step outside the expert layers, as the separate ops did it:
    with res, x_t += dt * (norm(res) in res's dtype @ w_out^T + b_out) in place; with
    w_in, out = x_t @ w_in^T + b_in in out's dtype (after the update). Returns x_t."""
    del launch
    if res is not None:
        if isinstance(norm, AdaRmsNorm):
            h = reference.ada_rms_norm(res, norm.scale, norm.shift, norm.eps)
        else:
            h = reference.rms_norm(res, norm.weight, norm.eps)
        velocity = torch.addmm(b_out.float(), h.float(), w_out.float().t())
        reference.euler_step(x_t, velocity, dt)
    if w_in is not None:
        out.copy_(torch.addmm(b_in.float(), x_t.float(), w_in.float().t()))
    return x_t


__all__ = [
    "AdaRmsNorm",
    "AttentionLaunch",
    "LinearLaunch",
    "RmsNorm",
    "accumulate",
    "decode_attention",
    "linear",
    "linear_gated_residual",
    "linear_gelu_mul",
    "linear_qkv_rope",
    "pair_order",
    "prologue",
    "unpack_columns",
    "velocity_euler_embed",
]
