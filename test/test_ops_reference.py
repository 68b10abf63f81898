"""CPU tests of flashrt_core.ops: every PyTorch twin (reached through the dispatch
layer, which picks the twin for CPU tensors) against an independent float64 formula
written here, plus in-place / out= semantics, FP8 rounding, dispatch and errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from flashrt_core import kernels, ops
from flashrt_core.ops import reference

FP8 = torch.float8_e4m3fn
EPS = 1e-6


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + 0.1).to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


# tolerance of ||out - ref|| / ||ref|| for an output rounded to the dtype
TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-12}


# --- independent float64 formulas -----------------------------------------------------


def naive_rms(rows: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(rows, dtype=torch.float64)
    for i, r in enumerate(rows.double().reshape(-1, rows.shape[-1])):
        out.view(-1, rows.shape[-1])[i] = r / math.sqrt(float((r * r).sum()) / r.numel() + EPS)
    return out


def naive_layer(rows: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(rows, dtype=torch.float64)
    for i, r in enumerate(rows.double().reshape(-1, rows.shape[-1])):
        mu = float(r.sum()) / r.numel()
        var = float(((r - mu) ** 2).sum()) / r.numel()
        out.view(-1, rows.shape[-1])[i] = (r - mu) / math.sqrt(var + EPS)
    return out


def naive_gelu(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
                         for v in x.double().flatten().tolist()], dtype=torch.float64).view(x.shape)


def e4m3_values() -> torch.Tensor:
    """All finite non-negative float8_e4m3fn values by code 0..126, from the format's
    definition (bias 7, 3 mantissa bits, subnormals, code 127 = NaN)."""
    vals = []
    for code in range(127):
        e, m = code >> 3, code & 7
        vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


def naive_e4m3_codes(y: torch.Tensor) -> torch.Tensor:
    """Round to nearest e4m3 (ties to the even code), saturate to 448, NaN -> 0x7f."""
    table = e4m3_values()
    codes = []
    for v in y.double().flatten().tolist():
        if math.isnan(v):
            codes.append(0x7F)
            continue
        a = min(abs(v), 448.0)
        i = int(torch.searchsorted(table, torch.tensor(a, dtype=torch.float64)))
        if i < len(table) and table[i] == a:
            code = i
        else:
            lo, hi = i - 1, i
            d_lo, d_hi = a - float(table[lo]), float(table[hi]) - a
            code = lo if d_lo < d_hi or (d_lo == d_hi and lo % 2 == 0) else hi
        codes.append(code | (0x80 if v < 0 or (v == 0 and math.copysign(1, v) < 0) else 0))
    return torch.tensor(codes, dtype=torch.uint8).view(y.shape)


def e4m3_step(v: torch.Tensor) -> torch.Tensor:
    """Spacing of e4m3 values around |v| (upper bound): 2^(floor(log2|v|) - 3)."""
    a = v.double().abs().clamp(min=2.0**-6)
    return torch.exp2(torch.floor(torch.log2(a)) - 3)


def assert_fp8_close(q: torch.Tensor, y: torch.Tensor, scale: float) -> None:
    """q (fp8) against the exact value y / scale: within one e4m3 step everywhere."""
    target = (y.double() / scale).clamp(-448, 448)
    assert torch.all((q.double() - target).abs() <= e4m3_step(target))


# --- norms ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4304), (7, 1024), (3, 5, 1152), (2, 13)])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm(dtype, shape, affine):
    x = randn(*shape, dtype=dtype)
    w = randn(shape[-1], dtype=dtype, seed=1, scale=0.3) if affine else None
    y = ops.rms_norm(x, w, eps=EPS)
    ref = naive_rms(x) * ((1 + w.double()) if affine else 1)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_updates_residual(dtype):
    x, res = randn(10, 2048, dtype=dtype), randn(10, 2048, dtype=dtype, seed=2)
    w = randn(2048, seed=3, scale=0.2)  # fp32 weights with bf16 activations
    w = w.to(dtype)
    new_res = (res.double() + x.double())
    y = ops.add_rms_norm(x, res, w, eps=EPS)
    assert rel_err(res, new_res) < TOL[dtype]
    # y normalizes what the residual now holds
    assert rel_err(y, naive_rms(res) * (1 + w.double())) < TOL[dtype]


def test_ada_rms_norm():
    x = randn(10, 1024)
    scale, shift = randn(1024, seed=1, scale=0.2), randn(1024, seed=2)
    y = ops.ada_rms_norm(x, scale, shift, eps=EPS)
    assert rel_err(y, naive_rms(x) * (1 + scale.double()) + shift.double()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_add_ada_rms_norm(dtype):
    x, res = randn(10, 1024, dtype=dtype), randn(10, 1024, dtype=dtype, seed=4)
    gate, scale, shift = (randn(1024, dtype=dtype, seed=s, scale=0.5) for s in (5, 6, 7))
    expected_res = res.double() + x.double() * gate.double()
    y = ops.gated_add_ada_rms_norm(x, res, gate, scale, shift, eps=EPS)
    assert rel_err(res, expected_res) < TOL[dtype]
    assert rel_err(y, naive_rms(res) * (1 + scale.double()) + shift.double()) < TOL[dtype]


def test_gated_add_returns_residual_in_place():
    x, res, gate = randn(3, 4304), randn(3, 4304, seed=1), randn(4304, seed=2)
    expected = res.double() + x.double() * gate.double()
    out = ops.gated_add(x, res, gate)
    assert out is res
    assert rel_err(res, expected) < 1e-6


@pytest.mark.parametrize("dim", [1152, 4304, 7])
def test_layer_norm(dim):
    x = randn(5, dim, scale=3.0)
    w, b = randn(dim, seed=1), randn(dim, seed=2)
    y = ops.layer_norm(x, w, b, eps=EPS)
    assert rel_err(y, naive_layer(x) * w.double() + b.double()) < 1e-6


def test_add_layer_norm():
    x, res = randn(4, 1152), randn(4, 1152, seed=1)
    w, b = randn(1152, seed=2), randn(1152, seed=3)
    expected_res = res.double() + x.double()
    y = ops.add_layer_norm(x, res, w, b, eps=EPS)
    assert rel_err(res, expected_res) < 1e-7
    assert rel_err(y, naive_layer(res) * w.double() + b.double()) < 1e-6


def test_norm_out_is_honoured():
    x, w = randn(6, 1024), randn(1024, seed=1)
    out = torch.full((6, 1024), float("nan"))
    y = ops.rms_norm(x, w, out=out)
    assert y is out
    assert rel_err(out, naive_rms(x) * (1 + w.double())) < 1e-6


def test_norm_fp8_output():
    x, w = randn(10, 1024), randn(1024, seed=1, scale=0.3)
    scale = torch.tensor([0.02])
    q = ops.rms_norm(x, w, out_scale=scale)
    assert q.dtype == FP8
    assert_fp8_close(q, naive_rms(x) * (1 + w.double()), 0.02)
    out = torch.empty(10, 1024, dtype=FP8)
    assert ops.rms_norm(x, w, out=out, out_scale=scale) is out
    assert torch.equal(out.view(torch.uint8), q.view(torch.uint8))


# --- activations ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("features", [4096, 4304, 5])
def test_gelu_tanh_mul(dtype, features):
    gu = randn(3, 2 * features, dtype=dtype, scale=2.0)
    y = ops.gelu_tanh_mul(gu)
    ref = naive_gelu(gu[:, :features]) * gu[:, features:].double()
    assert y.shape == (3, features)
    assert rel_err(y, ref) < TOL[dtype]


def test_gelu_tanh_plain_and_out():
    x = randn(2, 3, 4304, scale=3.0)
    out = torch.empty_like(x)
    assert ops.gelu_tanh(x, out=out) is out
    assert rel_err(out, naive_gelu(x)) < 1e-6


def test_gelu_tanh_mul_fp8():
    gu = randn(10, 2 * 4096, scale=2.0)
    scale = torch.tensor([0.01])
    q = ops.gelu_tanh_mul(gu, out_scale=scale)
    assert q.dtype == FP8
    assert_fp8_close(q, naive_gelu(gu[:, :4096]) * gu[:, 4096:].double(), 0.01)


# --- RoPE ---------------------------------------------------------------------------------


def rope_tables(max_pos: int, head_dim: int):
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def naive_rope(x: torch.Tensor, cos, sin, positions) -> torch.Tensor:
    """x [T, H, Dh] -> rotated, element by element (float64)."""
    out = torch.empty_like(x, dtype=torch.float64)
    half = x.shape[-1] // 2
    for t, p in enumerate(positions.tolist()):
        c, s = cos[p].double(), sin[p].double()
        for h in range(x.shape[1]):
            v = x[t, h].double()
            out[t, h, :half] = v[:half] * c - v[half:] * s
            out[t, h, half:] = v[half:] * c + v[:half] * s
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_rope_split(dtype):
    tokens, hq, hkv, dh, cache_rows, offset = 10, 8, 1, 256, 40, 25
    cos, sin = rope_tables(600, dh)
    positions = torch.arange(560, 560 + tokens, dtype=torch.int32)
    qkv = randn(tokens, (hq + 2 * hkv) * dh, dtype=dtype)
    k_cache = torch.full((cache_rows, hkv, dh), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    q = ops.qkv_rope_split(qkv, cos, sin, positions, k_cache, v_cache, cache_offset=offset, q_scale=dh**-0.5)
    heads = qkv.view(tokens, hq + 2 * hkv, dh)
    assert q.shape == (tokens, hq, dh)
    assert rel_err(q, naive_rope(heads[:, :hq], cos, sin, positions) * dh**-0.5) < TOL[dtype]
    rows = slice(offset, offset + tokens)
    assert rel_err(k_cache[rows], naive_rope(heads[:, hq:hq + hkv], cos, sin, positions)) < TOL[dtype]
    assert torch.equal(v_cache[rows], heads[:, hq + hkv:])
    # rows outside the written range are untouched
    assert torch.isnan(k_cache[:offset]).all() and torch.isnan(v_cache[offset + tokens:]).all()


def test_qkv_rope_split_out_and_gqa():
    tokens, hq, hkv, dh = 3, 4, 2, 72
    cos, sin = rope_tables(50, dh)
    positions = torch.tensor([7, 0, 49], dtype=torch.int32)
    qkv = randn(tokens, (hq + 2 * hkv) * dh)
    k_cache, v_cache = torch.zeros(3, hkv, dh), torch.zeros(3, hkv, dh)
    out = torch.empty(tokens, hq, dh)
    assert ops.qkv_rope_split(qkv, cos, sin, positions, k_cache, v_cache, out=out) is out
    heads = qkv.view(tokens, hq + 2 * hkv, dh)
    assert rel_err(out, naive_rope(heads[:, :hq], cos, sin, positions)) < 1e-6
    assert rel_err(k_cache, naive_rope(heads[:, hq:hq + hkv], cos, sin, positions)) < 1e-6


def test_rope_in_place():
    cos, sin = rope_tables(32, 128)
    positions = torch.tensor([3, 31, 0, 9], dtype=torch.int32)
    x = randn(4, 2, 128)
    before = x.clone()
    assert ops.rope(x, cos, sin, positions) is x
    assert rel_err(x, naive_rope(before, cos, sin, positions)) < 1e-6


# --- FP8, absmax ----------------------------------------------------------------------------


def test_quantize_fp8_matches_e4m3_definition():
    table = e4m3_values()
    mids = ((table[1:] + table[:-1]) / 2).float()  # exact ties: round to the even code
    special = torch.tensor([0.0, -0.0, 448.0, 449.0, 464.0, 480.0, 1e9, -1e9, 2.0**-9, 2.0**-10, 3 * 2.0**-10,
                            float("nan"), float("inf"), -float("inf")])
    x = torch.cat([mids, -mids, special, randn(4000, scale=100.0)])
    q = ops.quantize_fp8(x, torch.tensor([1.0]))
    assert q.dtype == FP8
    codes = q.view(torch.uint8)
    expected = naive_e4m3_codes(x)
    nan = torch.isnan(x)
    assert torch.equal(codes[~nan], expected[~nan])
    assert torch.isnan(q[nan].float()).all()


def test_quantize_fp8_applies_inverse_scale():
    x = randn(3, 1000, scale=5.0)
    scale = torch.tensor([0.037])
    q = ops.quantize_fp8(x, scale)
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(0.037, dtype=torch.float32)
    assert torch.equal(q.view(torch.uint8), naive_e4m3_codes(x * inv))
    out = torch.empty(3, 1000, dtype=FP8)
    assert ops.quantize_fp8(x, scale, out=out) is out


def test_absmax():
    x = randn(1000, 33, dtype=torch.bfloat16, scale=4.0)
    x[17, 5] = -100.0
    m = ops.absmax(x)
    assert m.shape == (1,) and m.dtype == torch.float32 and float(m) == 100.0
    running = torch.tensor([250.0])
    assert float(ops.absmax(x, out=running, accumulate=True)) == 250.0
    assert float(ops.absmax(x, out=running)) == 100.0
    x[0, 0] = float("nan")
    assert torch.isnan(ops.absmax(x)).all()


# --- flow step, images ----------------------------------------------------------------------


def test_euler_step_mixed_dtypes():
    x, v = randn(10, 32), randn(10, 32, dtype=torch.bfloat16, seed=1)
    expected = x.double() + (-0.1) * v.double()
    assert ops.euler_step(x, v, -0.1) is x
    assert rel_err(x, expected) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_images_to_patches(dtype):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 28, 42, 3), generator=g, dtype=torch.uint8)
    patch = 14
    y = ops.images_to_patches(images, patch, dtype=dtype)
    assert y.shape == (2 * 2 * 3, 3 * patch * patch) and y.dtype == dtype
    # the index mapping, element by element: row (view, ph, pw), column (c, kh, kw)
    gathered = torch.empty(y.shape, dtype=torch.uint8)
    for v in range(2):
        for ph in range(2):
            for pw in range(3):
                row = (v * 2 + ph) * 3 + pw
                for c in range(3):
                    for kh in range(patch):
                        for kw in range(patch):
                            gathered[row, (c * patch + kh) * patch + kw] = images[v, ph * patch + kh, pw * patch + kw, c]
    # the value: x / 255 * 2 - 1, exact up to one rounding to fp32, then to dtype
    values = torch.tensor([v / 255 * 2 - 1 for v in gathered.flatten().tolist()], dtype=torch.float64)
    assert torch.equal(y, values.float().view(y.shape).to(dtype))
    assert y.min() >= -1 and y.max() <= 1


# --- attention --------------------------------------------------------------------------------


def naive_attention(q, k, v, bias, scale):
    tokens, hq, dh = q.shape
    group = hq // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for t in range(tokens):
        for h in range(hq):
            kv = h // group
            logits = [float(q[t, h].double() @ k[s, kv].double()) * scale
                      + (0.0 if bias is None else float(bias[t, s] if bias.dim() == 2 else bias[s]))
                      for s in range(k.shape[0])]
            top = max(logits)
            w = torch.tensor([math.exp(a - top) for a in logits], dtype=torch.float64)
            out[t, h] = (w / w.sum()) @ v[:, kv].double()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_gqa_with_key_mask(dtype):
    tokens, hq, hkv, dh, keys = 3, 4, 2, 64, 45
    q, k, v = randn(tokens, hq, dh, dtype=dtype), randn(keys, hkv, dh, dtype=dtype, seed=1), randn(
        keys, hkv, dh, dtype=dtype, seed=2)
    bias = torch.zeros(keys)
    bias[30:40] = -float("inf")  # padded prompt tokens
    y = ops.decode_attention(q, k, v, bias=bias)
    assert rel_err(y, naive_attention(q, k, v, bias, dh**-0.5)) < TOL[dtype]


def test_decode_attention_per_query_bias_and_out():
    tokens, hq, dh, keys = 2, 2, 16, 9
    q, k, v = randn(tokens, hq, dh), randn(keys, 1, dh, seed=1), randn(keys, 1, dh, seed=2)
    bias = randn(tokens, keys, seed=3)
    bias[1, 5:] = -float("inf")  # e.g. Pi0's state token that must not see action keys
    out = torch.empty(tokens, hq, dh)
    assert ops.decode_attention(q, k, v, bias=bias, scale=0.3, out=out) is out
    assert rel_err(out, naive_attention(q, k, v, bias, 0.3)) < 1e-6


def test_decode_attention_fully_masked_row_is_nan():
    q, k, v = randn(2, 1, 8), randn(4, 1, 8, seed=1), randn(4, 1, 8, seed=2)
    bias = torch.zeros(2, 4)
    bias[0] = -float("inf")
    y = ops.decode_attention(q, k, v, bias=bias)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_rope_attention_is_split_then_attention(dtype):
    tokens, hq, hkv, dh, prefix = 4, 4, 2, 32, 13
    cos, sin = rope_tables(64, dh)
    positions = torch.arange(prefix, prefix + tokens, dtype=torch.int32)
    qkv = randn(tokens, (hq + 2 * hkv) * dh, dtype=dtype)
    k_cache, v_cache = randn(prefix + tokens + 3, hkv, dh, dtype=dtype, seed=1), randn(
        prefix + tokens + 3, hkv, dh, dtype=dtype, seed=2)
    untouched = k_cache[prefix + tokens:].clone()
    bias = torch.zeros(prefix + tokens)
    bias[5:9] = -float("inf")
    y = ops.qkv_rope_attention(qkv, cos, sin, positions, k_cache, v_cache, prefix, bias=bias)
    heads = qkv.view(tokens, hq + 2 * hkv, dh)
    k_fresh = naive_rope(heads[:, hq:hq + hkv], cos, sin, positions)
    assert rel_err(k_cache[prefix:prefix + tokens], k_fresh) < TOL[dtype]
    assert torch.equal(v_cache[prefix:prefix + tokens], heads[:, hq + hkv:])
    assert torch.equal(k_cache[prefix + tokens:], untouched)
    q = naive_rope(heads[:, :hq], cos, sin, positions)
    keys = prefix + tokens
    expected = naive_attention(q, k_cache[:keys], v_cache[:keys], bias, dh**-0.5)
    assert y.shape == (tokens, hq, dh) and y.dtype == dtype
    assert rel_err(y, expected) < TOL[dtype]


# --- dispatch -------------------------------------------------------------------------------


def test_cpu_tensors_use_the_twin(monkeypatch):
    def no_kernel():
        raise AssertionError("a kernel was dispatched for CPU tensors")

    monkeypatch.setattr(kernels, "module", no_kernel)
    x, res, w = randn(4, 1024), randn(4, 1024, seed=1), randn(1024, seed=2)
    res_twin = res.clone()
    y = ops.add_rms_norm(x, res, w)
    y_twin = reference.add_rms_norm(x, res_twin, w)
    assert torch.equal(y, y_twin) and torch.equal(res, res_twin)


def test_use_reference_and_env_switch(monkeypatch):
    with ops.use_reference():
        with ops.use_reference():
            assert not ops.kernels_enabled()
        assert not ops.kernels_enabled()
    monkeypatch.setenv("FLASHRT_DISABLE_KERNELS", "1")
    assert not ops.kernels_enabled()
    monkeypatch.delenv("FLASHRT_DISABLE_KERNELS")
    assert ops.kernels_enabled() == kernels.available()


def test_fp64_runs_on_the_twin():
    x = randn(3, 100, dtype=torch.float64)
    assert rel_err(ops.rms_norm(x), naive_rms(x)) < 1e-12


# --- errors ---------------------------------------------------------------------------------


def _bad_calls():
    x = randn(4, 64)
    cos, sin = rope_tables(16, 8)
    pos = torch.arange(2, dtype=torch.int32)
    return [
        ("rms_norm", lambda: ops.rms_norm(x, randn(63)), "weight has shape"),
        ("add_rms_norm", lambda: ops.add_rms_norm(x, randn(4, 64, dtype=torch.bfloat16)), "residual has dtype"),
        ("add_rms_norm", lambda: ops.add_rms_norm(x, x), "distinct"),
        ("rms_norm", lambda: ops.rms_norm(x, out=torch.empty(4, 64, dtype=FP8)), "needs out_scale"),
        ("rms_norm", lambda: ops.rms_norm(x, out=torch.empty(4, 65)), "out has shape"),
        ("rms_norm", lambda: ops.rms_norm(x, out=torch.empty(4, 64, dtype=torch.float16)), "out has dtype"),
        ("rms_norm", lambda: ops.rms_norm(x.int()), "x has dtype"),
        ("gated_add_ada_rms_norm",
         lambda: ops.gated_add_ada_rms_norm(x, randn(4, 64), randn(64), randn(64).half(), randn(64)), "share one"),
        ("ada_rms_norm", lambda: ops.ada_rms_norm(x, None, randn(64)), "scale is required"),
        ("gelu_tanh_mul", lambda: ops.gelu_tanh_mul(randn(2, 7)), "even"),
        ("qkv_rope_split", lambda: ops.qkv_rope_split(randn(2, 36), cos, sin, pos, torch.zeros(4, 1, 8),
                                                      torch.zeros(4, 1, 8)), "qkv width"),
        ("qkv_rope_split", lambda: ops.qkv_rope_split(randn(2, 32), cos, sin, pos, torch.zeros(4, 1, 8),
                                                      torch.zeros(4, 1, 8), cache_offset=3), "exceed the cache"),
        ("qkv_rope_split", lambda: ops.qkv_rope_split(randn(2, 32), cos, sin, pos.long(), torch.zeros(4, 1, 8),
                                                      torch.zeros(4, 1, 8)), "positions has dtype"),
        ("rope", lambda: ops.rope(randn(2, 1, 8), cos[:, :3], sin, pos), "cos has shape"),
        ("quantize_fp8", lambda: ops.quantize_fp8(x, None), "scale is required"),
        ("quantize_fp8", lambda: ops.quantize_fp8(x, torch.tensor([1.0, 2.0])), "one element"),
        ("absmax", lambda: ops.absmax(x, accumulate=True), "needs out"),
        ("euler_step", lambda: ops.euler_step(x, randn(4, 63), 0.1), "v has shape"),
        ("images_to_patches", lambda: ops.images_to_patches(torch.zeros(1, 20, 28, 3, dtype=torch.uint8)),
         "not a multiple"),
        ("decode_attention", lambda: ops.decode_attention(randn(2, 3, 8), randn(5, 2, 8), randn(5, 2, 8)), "Hkv | Hq"),
        ("decode_attention", lambda: ops.decode_attention(randn(2, 2, 8), randn(5, 1, 8), randn(5, 1, 8),
                                                          bias=torch.zeros(3, 5)), "bias has shape"),
        ("qkv_rope_attention", lambda: ops.qkv_rope_attention(randn(2, 32), cos, sin, pos, torch.zeros(4, 1, 8),
                                                              torch.zeros(4, 1, 8), 1, bias=torch.zeros(4)),
         r"bias has shape \(4,\), expected \(2, 3\)"),
    ]


@pytest.mark.parametrize("op,call,message", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_value_error_naming_the_op(op, call, message):
    with pytest.raises(ValueError, match=f"^{op}: .*{message}"):
        call()


# --- the extension, where it is built (no GPU needed) ------------------------------------------


def test_python_dtype_codes_mirror_the_header():
    header = (Path(__file__).resolve().parent.parent / "cuda_src" / "dtype_codes.h").read_text()
    codes = {name: int(value) for name, value in re.findall(r"\bk(\w+) = (\d+),", header)}
    names = {"Float32": "FLOAT32", "BFloat16": "BFLOAT16", "Float16": "FLOAT16", "Float8E4M3": "FLOAT8_E4M3",
             "UInt8": "UINT8", "Int32": "INT32"}
    assert {names[k]: v for k, v in codes.items()} == {d.name: int(d) for d in kernels.DType}


def test_extension_reports_consistent_metadata():
    if not kernels.available():
        assert "build" in kernels.unavailable_reason() or "rebuild" in kernels.unavailable_reason()
        pytest.skip(kernels.unavailable_reason())
    codes = kernels.module().dtype_codes()
    assert codes == {str(t).removeprefix("torch."): int(c) for t, c in kernels._TORCH_TO_CODE.items()}
    assert kernels.compiled_archs() and all(a >= 75 for a in kernels.compiled_archs())


def test_extension_rejects_bad_arguments_before_touching_the_gpu():
    if not kernels.available():
        pytest.skip(kernels.unavailable_reason())
    k = kernels.module()
    with pytest.raises(ValueError, match="rms_norm: dim must be positive"):
        k.row_norm(x=8, residual=0, gate=0, weight=0, mod_scale=0, shift=0, out=16, out_scale=0, rows=1, dim=0,
                   eps=1e-6, weight_offset=1.0, layer_norm=False, act_dtype=1, param_dtype=1, out_dtype=1, stream=0)
    with pytest.raises(ValueError, match="unsupported activation dtype"):
        k.euler_step(x=16, v=16, dt=0.1, n=8, x_dtype=int(kernels.DType.UINT8), v_dtype=0, stream=0)
    with pytest.raises(ValueError, match="workspace has 0 floats"):
        k.decode_attention(q=16, k=16, v=16, bias=0, out=16, workspace=16, workspace_floats=0, tokens=10,
                           num_q_heads=8, num_kv_heads=1, head_dim=256, keys=570, bias_row_stride=0, scale=1.0,
                           act_dtype=1, stream=0)
