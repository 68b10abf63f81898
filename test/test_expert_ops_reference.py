"""CPU tests of the action-expert ops (flashrt_core.ops.expert): the twins against
naive float64 formulas on unpacked weights, weight packing round trips, FP8 weight
quantization, and the errors on bad input. The kernels themselves are checked against
these twins in test_expert_kernels_gpu.py."""

from __future__ import annotations

import math

import pytest
import torch

from flashrt_core.ops import expert
from flashrt_core.ops.expert import AdaRmsNorm, RmsNorm

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale + 0.05).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def normalized(x, norm):
    """float64 prologue, rounded to bf16 like the kernel's input to the dot products."""
    xd = x.double()
    if norm is None:
        return xd.to(BF16).double()
    y = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + norm.eps)
    if isinstance(norm, RmsNorm):
        y = y * (1 + norm.weight.double())
    else:
        y = y * (1 + norm.scale.double()) + norm.shift.double()
    return y.to(BF16).double()


def gelu_tanh64(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def rotate64(x, cos, sin):
    """rotate-half RoPE, x [M, H, D] float64, cos/sin [M, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


NORMS = {
    "none": lambda k: None,
    "rms": lambda k: RmsNorm(rnd(k, scale=0.2)),
    "ada": lambda k: AdaRmsNorm(rnd(k, scale=0.2), rnd(k, scale=0.2)),
}


# --- packing and quantization --------------------------------------------------------


def test_pair_order_puts_partners_eight_rows_apart():
    rows = 64
    order = expert.pair_order(rows)
    assert sorted(order.tolist()) == list(range(rows))
    for block in order.view(-1, 16):
        assert torch.equal(block[8:], block[:8] + rows // 2)


def test_gate_up_pack_round_trip_and_layout():
    gate, up = rnd(32, 24), rnd(32, 24)
    packed = expert.pack_gate_up(gate, up)
    assert packed.shape == (64, 24)
    assert torch.equal(packed[0:8], gate[0:8]) and torch.equal(packed[8:16], up[0:8])
    assert torch.equal(packed[16:24], gate[8:16])
    g2, u2 = expert.unpack_gate_up(packed)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_qkv_rope_pack_round_trip_and_layout():
    d, k = 32, 16
    q, kw, v = rnd(3 * d, k), rnd(d, k), rnd(d, k)
    packed = expert.pack_qkv_rope(q, kw, v, d)
    assert packed.shape == (5 * d, k)
    # head 1 of q: rows [8, 16) of the packed head are dims [16, 24) (d + D/2 of dims 0..7)
    assert torch.equal(packed[d + 8:d + 16], q[d + 16:d + 24])
    assert torch.equal(packed[3 * d:3 * d + 8], kw[0:8])
    back = expert.unpack_qkv_rope(packed, d, num_kv_heads=1)
    for a, b in zip(back, (q, kw, v)):
        assert torch.equal(a, b)


def test_quantize_weight_fp8_per_row_scale():
    w = rnd(16, 64)
    w[3] = 0.0
    w[5] *= 1000.0
    w8, scale = expert.quantize_weight_fp8(w)
    assert w8.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (16,)
    assert scale[3] == 1.0
    torch.testing.assert_close(scale[5], w[5].abs().max() / 448.0)
    back = w8.float() * scale[:, None]
    assert (back - w).abs().max() <= (w.abs().amax(1, keepdim=True) * 2**-4).max()
    assert float(w8.float().abs().amax(1)[5]) == 448.0


def test_quantize_weight_fp8_rejects_non_finite():
    w = rnd(4, 8)
    w[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        expert.quantize_weight_fp8(w)


# --- twins against float64 formulas --------------------------------------------------


@pytest.mark.parametrize("norm_kind", list(NORMS))
@pytest.mark.parametrize("x_dtype", [BF16, torch.float32])
@pytest.mark.parametrize("w_kind", ["bf16", "fp8"])
def test_linear_matches_float64(norm_kind, x_dtype, w_kind):
    m, k, n = 10, 128, 48
    x = rnd(m, k, dtype=x_dtype, scale=2.0)
    w = rnd(n, k, scale=0.1)
    norm = NORMS[norm_kind](k)
    bias = rnd(n)
    w_scale = None
    if w_kind == "fp8":
        w, w_scale = expert.quantize_weight_fp8(w)
        w_eff = w.double() * w_scale.double()[:, None]
    else:
        w = w.to(BF16)
        w_eff = w.double()
    out = expert.linear(x, w, w_scale=w_scale, norm=norm, bias=bias)
    ref = normalized(x, norm) @ w_eff.t() + bias.double()
    assert out.dtype == BF16 and out.shape == (m, n)
    assert rel_err(out, ref) < 4e-3


def test_linear_writes_strided_out():
    x, w = rnd(4, 64, dtype=BF16), rnd(32, 64, dtype=BF16)
    buf = torch.full((4, 40), float("nan"), dtype=BF16)
    out = buf[:, :32]
    assert expert.linear(x, w, out=out) is out
    assert torch.isnan(buf[:, 32:]).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("res_dtype", [BF16, torch.float32])
@pytest.mark.parametrize("with_gate", [True, False])
def test_linear_gated_residual_matches_float64(res_dtype, with_gate):
    m, k, n = 10, 256, 64
    x, w = rnd(m, k, dtype=BF16), rnd(n, k, dtype=BF16, scale=0.1)
    gate = rnd(n) if with_gate else None
    residual = rnd(m, n, dtype=res_dtype, scale=3.0)
    before = residual.double().clone()
    ret = expert.linear_gated_residual(x, w, residual, gate=gate)
    acc = x.double() @ w.double().t()
    ref = before + acc * (gate.double() if with_gate else 1.0)
    assert ret is residual and residual.dtype == res_dtype
    assert rel_err(residual, ref) < 4e-3


@pytest.mark.parametrize("norm_kind", ["rms", "ada"])
def test_linear_gelu_mul_matches_float64(norm_kind):
    m, k, f = 10, 128, 64
    x = rnd(m, k, dtype=BF16)
    gate_w, up_w = rnd(f, k, dtype=BF16, scale=0.1), rnd(f, k, dtype=BF16, scale=0.1)
    norm = NORMS[norm_kind](k)
    out = expert.linear_gelu_mul(x, expert.pack_gate_up(gate_w, up_w), norm=norm)
    xn = normalized(x, norm)
    ref = gelu_tanh64(xn @ gate_w.double().t()) * (xn @ up_w.double().t())
    assert out.shape == (m, f) and out.dtype == BF16
    assert rel_err(out, ref) < 4e-3


def test_linear_qkv_rope_matches_float64():
    m, k, d, hq, hkv, s_max, off = 10, 64, 32, 4, 1, 40, 17
    x = rnd(m, k, dtype=BF16)
    qw, kw, vw = (rnd(h * d, k, dtype=BF16, scale=0.2) for h in (hq, hkv, hkv))
    norm = NORMS["ada"](k)
    max_pos = 64
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = angles.cos().float(), angles.sin().float()
    positions = torch.randint(0, max_pos, (m,), dtype=torch.int32)
    k_cache = torch.full((s_max, hkv, d), float("nan"), dtype=BF16)
    v_cache = torch.full((s_max, hkv, d), float("nan"), dtype=BF16)
    q_scale = d**-0.5
    q = expert.linear_qkv_rope(x, expert.pack_qkv_rope(qw, kw, vw, d), cos=cos, sin=sin, positions=positions,
                               k_cache=k_cache, v_cache=v_cache, cache_offset=torch.tensor([off], dtype=torch.int32),
                               q_scale=q_scale, norm=norm)
    xn = normalized(x, norm)
    c, s = cos.double()[positions.long()], sin.double()[positions.long()]
    q_ref = rotate64((xn @ qw.double().t()).view(m, hq, d), c, s) * q_scale
    k_ref = rotate64((xn @ kw.double().t()).view(m, hkv, d), c, s)
    v_ref = (xn @ vw.double().t()).view(m, hkv, d)
    assert q.shape == (m, hq, d) and q.dtype == BF16
    assert rel_err(q, q_ref) < 4e-3
    assert rel_err(k_cache[off:off + m], k_ref) < 4e-3
    assert rel_err(v_cache[off:off + m], v_ref) < 4e-3
    assert torch.isnan(k_cache[:off].float()).all() and torch.isnan(v_cache[off + m:].float()).all()


def attention64(q, k, v, bias, scale):
    """float64 softmax attention per query head; q [M, Hq, D], k/v [S, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    kf = k.double().repeat_interleave(group, dim=1)  # [S, Hq, D]
    vf = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,shd->hms", q.double(), kf) * scale
    if bias is not None:
        scores = scores + (bias.double() if bias.dim() == 1 else bias.double()[None])
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("hms,shd->mhd", p, vf)


@pytest.mark.parametrize("hkv", [1, 2])
@pytest.mark.parametrize("bias_kind", ["none", "shared", "per_token"])
def test_decode_attention_matches_float64(hkv, bias_kind):
    m, hq, d, s = 6, 8, 32, 50
    q, k, v = rnd(m, hq, d, dtype=BF16), rnd(s, hkv, d, dtype=BF16), rnd(s, hkv, d, dtype=BF16)
    bias = None
    if bias_kind == "shared":
        bias = torch.zeros(s)
        bias[40:] = float("-inf")
    elif bias_kind == "per_token":
        bias = rnd(m, s)
        bias[:, ::3] = float("-inf")
    out = expert.decode_attention(q, k, v, bias=bias)
    ref = attention64(q, k, v, bias, d**-0.5)
    assert out.shape == q.shape and out.dtype == BF16
    assert rel_err(out, ref) < 4e-3


def test_decode_attention_fully_masked_row_is_zero():
    m, hq, d, s = 3, 2, 16, 10
    q, k, v = rnd(m, hq, d, dtype=BF16), rnd(s, 1, d, dtype=BF16), rnd(s, 1, d, dtype=BF16)
    bias = torch.zeros(m, s)
    bias[1] = float("-inf")
    out = expert.decode_attention(q, k, v, bias=bias, scale=0.3)
    assert torch.equal(out[1].float(), torch.zeros(hq, d))
    keep = [0, 2]
    ref = attention64(q[keep], k, v, bias[keep], 0.3)
    assert rel_err(out[keep], ref) < 4e-3
    shared = torch.full((s,), float("-inf"))
    assert torch.equal(expert.decode_attention(q, k, v, bias=shared).float(), torch.zeros(m, hq, d))


# --- velocity_euler_embed ---------------------------------------------------------------


def _action_head(dim=64, actions=8):
    return dict(w_out=rnd(actions, dim, scale=dim**-0.5), b_out=rnd(actions, scale=0.1),
                w_in=rnd(dim, actions, scale=actions**-0.5), b_in=rnd(dim, scale=0.1))


@pytest.mark.parametrize("norm_kind", ["rms", "ada"])
@pytest.mark.parametrize("res_dtype", [BF16, torch.float32])
def test_velocity_euler_embed_matches_float64(norm_kind, res_dtype):
    """Velocity head on the final norm (rounded to res's dtype), Euler step, then the
    next embedding of the updated x_t, written over the same rows the norm read."""
    rows, dim, actions, dt = 5, 64, 8, -0.1
    head = _action_head(dim, actions)
    norm = RmsNorm(rnd(dim, scale=0.2)) if norm_kind == "rms" else AdaRmsNorm(rnd(dim, scale=0.2), rnd(dim, scale=0.2))
    res = rnd(rows, dim, dtype=res_dtype, scale=3.0)
    x_t = rnd(rows, actions)
    xd = res.double()
    h = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + norm.eps)
    h = h * (1 + norm.weight.double()) if norm_kind == "rms" else h * (1 + norm.scale.double()) + norm.shift.double()
    h = h.to(res_dtype).double()
    x_expected = x_t.double() + dt * (h @ head["w_out"].double().t() + head["b_out"].double())
    embed_expected = x_expected @ head["w_in"].double().t() + head["b_in"].double()

    returned = expert.velocity_euler_embed(x_t, res=res, norm=norm, dt=dt, out=res, **head)
    assert returned is x_t
    assert rel_err(x_t, x_expected) < 1e-6
    assert rel_err(res, embed_expected) < (4e-3 if res_dtype == BF16 else 1e-6)


def test_velocity_euler_embed_halves_run_alone():
    """Without w_in only x_t moves (out untouched); without res only the embedding runs."""
    head = _action_head()
    res, x_t = rnd(3, 64, dtype=BF16), rnd(3, 8)
    out = torch.full((3, 64), float("nan"), dtype=BF16)
    x_before = x_t.clone()
    expert.velocity_euler_embed(x_t, res=res, norm=RmsNorm(torch.zeros(64)), dt=0.5, out=out,
                                **{k: v for k, v in head.items() if k.endswith("_out")})
    assert not torch.equal(x_t, x_before) and torch.isnan(out.float()).all()
    x_before = x_t.clone()
    expert.velocity_euler_embed(x_t, w_in=head["w_in"], b_in=head["b_in"], out=out)
    assert torch.equal(x_t, x_before)
    assert rel_err(out, x_t.double() @ head["w_in"].double().t() + head["b_in"].double()) < 4e-3


# --- errors --------------------------------------------------------------------------


def _qkv_args(**over):
    d = 32
    args = dict(x=rnd(2, 64, dtype=BF16), w=rnd(6 * d, 64, dtype=BF16), cos=torch.ones(8, d // 2),
                sin=torch.zeros(8, d // 2), positions=torch.zeros(2, dtype=torch.int32),
                k_cache=torch.zeros(8, 1, d, dtype=BF16), v_cache=torch.zeros(8, 1, d, dtype=BF16),
                cache_offset=torch.zeros(1, dtype=torch.int32))
    args.update(over)
    return args


def _head_args(**over):
    args = dict(res=rnd(3, 64, dtype=BF16), norm=RmsNorm(rnd(64)), dt=-0.1, out=rnd(3, 64, dtype=BF16),
                **_action_head())
    args.update(over)
    return args


@pytest.mark.parametrize("call, match", [
    (lambda: expert.linear(rnd(64, dtype=BF16), rnd(16, 64, dtype=BF16)), "2 dims"),
    (lambda: expert.linear(rnd(2, 64, dtype=BF16), rnd(16, 32, dtype=BF16)), "shape"),
    (lambda: expert.linear(rnd(2, 64, dtype=torch.float16), rnd(16, 64, dtype=BF16)), "dtype"),
    (lambda: expert.linear(rnd(2, 64, dtype=BF16), rnd(16, 64).to(FP8)), "w_scale"),
    (lambda: expert.linear(rnd(2, 64, dtype=BF16), rnd(16, 64, dtype=BF16), w_scale=torch.ones(16)), "w_scale"),
    (lambda: expert.linear(rnd(2, 64, dtype=BF16), rnd(16, 64, dtype=BF16), norm=RmsNorm(rnd(32))), "norm.weight"),
    (lambda: expert.linear(rnd(2, 64, dtype=BF16), rnd(16, 64, dtype=BF16), norm=RmsNorm(rnd(64)),
                           bias=rnd(16, dtype=BF16)), "share one dtype"),
    (lambda: expert.linear(rnd(2, 64, dtype=BF16), rnd(16, 64, dtype=BF16), norm="rms"), "norm must be"),
    (lambda: expert.linear(rnd(2, 64, dtype=BF16), rnd(16, 64, dtype=BF16),
                           out=torch.empty(2, 16, dtype=torch.float32)), "dtype"),
    (lambda: expert.linear_gated_residual(rnd(2, 64, dtype=BF16), rnd(16, 64, dtype=BF16),
                                          rnd(2, 8, dtype=BF16)), "shape"),
    (lambda: expert.linear_gelu_mul(rnd(2, 64, dtype=BF16), rnd(24, 64, dtype=BF16)), "multiple of 16"),
    (lambda: expert.linear_qkv_rope(**_qkv_args(w=rnd(100, 64, dtype=BF16))), "heads of"),
    (lambda: expert.linear_qkv_rope(**_qkv_args(cos=torch.ones(8, 8))), "cos must be"),
    (lambda: expert.linear_qkv_rope(**_qkv_args(positions=torch.zeros(2, dtype=torch.int64))), "positions"),
    (lambda: expert.linear_qkv_rope(**_qkv_args(cache_offset=torch.zeros(2, dtype=torch.int32))), "one element"),
    (lambda: expert.decode_attention(rnd(2, 3, 16, dtype=BF16), rnd(5, 2, 16, dtype=BF16),
                                     rnd(5, 2, 16, dtype=BF16)), "Hq % Hkv"),
    (lambda: expert.decode_attention(rnd(2, 2, 16, dtype=BF16), rnd(5, 1, 16, dtype=BF16),
                                     rnd(5, 1, 16, dtype=BF16), bias=torch.zeros(4)), "bias must be"),
    (lambda: expert.velocity_euler_embed(rnd(3, 8)), "nothing to do"),
    (lambda: expert.velocity_euler_embed(rnd(3, 8, dtype=BF16), **_head_args()), "dtype"),
    (lambda: expert.velocity_euler_embed(rnd(4, 8), **_head_args()), "shape"),
    (lambda: expert.velocity_euler_embed(rnd(3, 8), **_head_args(norm=None)), "norm"),
    (lambda: expert.velocity_euler_embed(rnd(3, 8), **_head_args(w_out=rnd(8, 32))), "w_out"),
    (lambda: expert.velocity_euler_embed(rnd(3, 8), **_head_args(w_in=rnd(8, 64))), "w_in"),
    (lambda: expert.velocity_euler_embed(rnd(3, 8), **_head_args(out=None)), "needs out"),
    (lambda: expert.velocity_euler_embed(rnd(3, 8), **_head_args(b_in=rnd(64, dtype=BF16))), "dtype"),
    # one tensor on another device (meta stands in for a second device on the CPU)
    (lambda: expert.linear(rnd(2, 64, dtype=BF16), rnd(16, 64, dtype=BF16).to("meta")), "w is on meta, expected cpu"),
    (lambda: expert.linear_gated_residual(rnd(2, 64, dtype=BF16), rnd(16, 64, dtype=BF16),
                                          rnd(2, 16, dtype=BF16).to("meta")), "residual is on meta"),
    (lambda: expert.linear_qkv_rope(**_qkv_args(positions=torch.zeros(2, dtype=torch.int32, device="meta"))),
     "positions is on meta"),
    (lambda: expert.decode_attention(rnd(2, 2, 16, dtype=BF16), rnd(5, 1, 16, dtype=BF16),
                                     rnd(5, 1, 16, dtype=BF16), bias=torch.zeros(5, device="meta")), "bias is on meta"),
    (lambda: expert.velocity_euler_embed(rnd(3, 8), **_head_args(b_in=rnd(64).to("meta"))), "b_in is on meta"),
    (lambda: expert.pack_gate_up(rnd(12, 8), rnd(12, 8)), "F % 8"),
    (lambda: expert.pack_qkv_rope(rnd(40, 8), rnd(20, 8), rnd(20, 8), 20), "multiple of 16"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_gated_residual_rejects_aliased_input():
    buf = rnd(4, 128, dtype=BF16)
    with pytest.raises(ValueError, match="share memory"):
        expert.linear_gated_residual(buf[:, 32:96], rnd(64, 64, dtype=BF16), buf[:, :64])
