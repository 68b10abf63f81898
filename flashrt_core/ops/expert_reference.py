"""PyTorch twins of the action-expert kernels (`flashrt_core.ops.expert`): same
signatures, same semantics, fp32 arithmetic. They run wherever torch runs and are the
oracle of the kernels' GPU tests. They do not validate; call them through
`flashrt_core.ops.expert`, which does.

Semantics shared with the kernels (cuda_src/small_m_linear.cu, decode_attention.cu,
expert_layer.cu):
- Prologue: x (bf16 or fp32) -> fp32 -> optional RMS / adaRMS norm -> rounded to bf16.
  That bf16 tensor is what the dot products see (as cuBLAS would in the unfused path).
- acc = prologue(x) @ W^T in fp32, W widened exactly from bf16 or FP8 E4M3; FP8 weights
  then scale acc by their per-row float32 scale.
- Epilogues take acc in fp32 and round once, to the destination dtype.
- W rows of the GeGLU and QKV epilogues are in packed order (`expert.pack_gate_up`,
  `expert.pack_qkv_rope`); the twins unpack the accumulator columns.
- Attention: softmax(q k^T * scale + bias) v in fp32; a query row whose keys are all
  masked (-inf) is zero.
- A whole expert layer (`expert_layers`) is the composition of the five ops above, so
  q, k, v, the attention output and gelu(gate) * up are rounded to bf16 where the five
  calls store them, and the residual after each of its two updates.
"""

from __future__ import annotations

from collections.abc import Sequence
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


@dataclass(frozen=True)
class ExpertLayerWeights:
    """One expert layer's GEMM weights, bf16, in the kernels' row order: qkv =
    pack_qkv_rope(q, k, v, D) [(Hq + 2 Hkv) * D, width], o [width, Hq * D], gate_up =
    pack_gate_up(gate, up) [2F, width], down [width, F]."""

    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass(frozen=True)
class ExpertLayerInputs:
    """What differs between the layers of one `expert_layers` launch: weights, the input
    and post-attention norms (RmsNorm for Pi0, AdaRmsNorm of the step for Pi0.5), the
    residual gates after attention and after the MLP (None: 1) and the layer's KV cache
    [S_max, Hkv, D]."""

    weights: ExpertLayerWeights
    norm_in: RmsNorm | AdaRmsNorm
    gate_in: torch.Tensor | None
    norm_post: RmsNorm | AdaRmsNorm
    gate_post: torch.Tensor | None
    k_cache: torch.Tensor
    v_cache: torch.Tensor


@dataclass(frozen=True)
class ExpertLayerLaunch:
    """Launch shape of expert_layer (kernel path only; 0 = automatic).

    pdl: programmatic dependent launch (the producer warps stream weights while the
    previous kernel drains). cooperative: launch as a cooperative kernel (the runtime
    then guarantees that every block is resident, which the grid barriers need).
    ring_slots (2..5) / in_flight: weight tiles buffered / requested ahead per block;
    attn_chunk: keys per attention work unit (multiple of 32); grid: blocks.
    merge_lanes (1, 2, 4, 8; 0 = 4): threads merging one attention output quad (the
    merge order, so the last bits, depend on it). sc_fences: grid barrier and split-K
    counters behind full fences instead of release / acquire (bit-identical). prefetch:
    norm vectors, gates and key bias into L2 at the start, K / V a layer ahead
    (bit-identical). trace (profiling): an int64 CUDA tensor of grid x layers x 24
    entries that receives, per block and layer, clock64 at the start and after each
    phase and barrier (12), the cycles each GEMV phase waited for weights (4), then
    clock64 when each GEMV phase had x staged (4) and had consumed its items (4)."""

    pdl: bool = False
    cooperative: bool = True
    ring_slots: int = 0
    in_flight: int = 0
    attn_chunk: int = 0
    grid: int = 0
    merge_lanes: int = 0
    sc_fences: bool = False
    prefetch: bool = True
    trace: torch.Tensor | None = None


def pair_order(rows: int) -> torch.Tensor:
    """Packed row p holds natural row order[p]: blocks of 16 packed rows pair natural
    rows [8t, 8t + 8) with [rows/2 + 8t, rows/2 + 8t + 8), so that row j and its
    partner j + rows/2 land 8 rows apart, in one lane of the kernel's MMA tile.
    GeGLU: gate | up rows (pack_gate_up); RoPE: dims d | d + D/2 of a head."""
    half = torch.arange(rows // 2).view(-1, 8)
    return torch.stack([half, half + rows // 2], dim=1).flatten()


def unpack_columns(acc: torch.Tensor, rows: int) -> torch.Tensor:
    """Last-dim groups of `rows` columns in pair_order(rows) -> natural order."""
    packed = acc.reshape(*acc.shape[:-1], -1, rows)
    natural = torch.empty_like(packed)
    natural[..., pair_order(rows).to(acc.device)] = packed
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


def expert_layers(res, layers: Sequence[ExpertLayerInputs], *, cos, sin, positions, cache_offset, key_bias, keys,
                  q_scale, attn_scale=1.0, workspace=None, stop_after_kv=False, launch=None):
    """Expert layers on the residual res [M, width] (bf16, in place), each the five
    small-M ops: QKV + RoPE + KV-cache write at cache_offset, attention over cache rows
    [0, keys) with key_bias [keys], o_proj with the gated residual, the post norm's
    GeGLU MLP and down with the gated residual. stop_after_kv: the last layer only
    writes its K / V. Returns res."""
    del workspace, launch
    m = res.shape[0]
    for index, layer in enumerate(layers):
        w = layer.weights
        q = linear_qkv_rope(res, w.qkv, norm=layer.norm_in, cos=cos, sin=sin, positions=positions,
                            k_cache=layer.k_cache, v_cache=layer.v_cache, cache_offset=cache_offset, q_scale=q_scale)
        if stop_after_kv and index == len(layers) - 1:
            break
        attn = decode_attention(q, layer.k_cache[:keys], layer.v_cache[:keys], bias=key_bias, scale=attn_scale)
        linear_gated_residual(attn.reshape(m, -1), w.o, res, gate=layer.gate_in)
        h = linear_gelu_mul(res, w.gate_up, norm=layer.norm_post)
        linear_gated_residual(h, w.down, res, gate=layer.gate_post)
    return res


def expert_layer(res, layer: ExpertLayerWeights, *, norm_in, gate_in, norm_post, gate_post, cos, sin, positions,
                 k_cache, v_cache, cache_offset, key_bias, keys, q_scale, attn_scale=1.0, workspace=None,
                 stop_after_kv=False, launch=None):
    """One expert layer (expert_layers of one layer). Returns res."""
    inputs = ExpertLayerInputs(layer, norm_in, gate_in, norm_post, gate_post, k_cache, v_cache)
    return expert_layers(res, [inputs], cos=cos, sin=sin, positions=positions, cache_offset=cache_offset,
                         key_bias=key_bias, keys=keys, q_scale=q_scale, attn_scale=attn_scale, workspace=workspace,
                         stop_after_kv=stop_after_kv, launch=launch)


__all__ = [
    "AdaRmsNorm",
    "AttentionLaunch",
    "ExpertLayerInputs",
    "ExpertLayerLaunch",
    "ExpertLayerWeights",
    "LinearLaunch",
    "RmsNorm",
    "accumulate",
    "decode_attention",
    "expert_layer",
    "expert_layers",
    "linear",
    "linear_gated_residual",
    "linear_gelu_mul",
    "linear_qkv_rope",
    "pair_order",
    "prologue",
    "unpack_columns",
]
