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


# --- whole layers (expert_layers: the composition of the ops above) ---------------------


class TinyLayer:
    """Random expert-layer weights at tiny dims (natural row order kept for float64)."""

    def __init__(self, width, hq, hkv, d, mlp, s_max, norm_kind):
        self.q_w, self.k_w, self.v_w = (rnd(h * d, width, dtype=BF16, scale=width**-0.5) for h in (hq, hkv, hkv))
        self.o_w = rnd(width, hq * d, dtype=BF16, scale=(hq * d) ** -0.5)
        self.gate_w, self.up_w = (rnd(mlp, width, dtype=BF16, scale=width**-0.5) for _ in range(2))
        self.down_w = rnd(width, mlp, dtype=BF16, scale=mlp**-0.5)
        self.norm_in, self.norm_post = NORMS[norm_kind](width), NORMS[norm_kind](width)
        ada = norm_kind == "ada"
        self.gate_in, self.gate_post = (rnd(width, scale=0.5) if ada else None for _ in range(2))
        self.k_cache, self.v_cache = rnd(s_max, hkv, d, dtype=BF16), rnd(s_max, hkv, d, dtype=BF16)
        self.d = d

    def inputs(self):
        weights = expert.ExpertLayerWeights(expert.pack_qkv_rope(self.q_w, self.k_w, self.v_w, self.d), self.o_w,
                                            expert.pack_gate_up(self.gate_w, self.up_w), self.down_w)
        return expert.ExpertLayerInputs(weights, self.norm_in, self.gate_in, self.norm_post, self.gate_post,
                                        self.k_cache, self.v_cache)

    def forward64(self, x, cos, sin, positions, offset, bias, keys, q_scale, attn_scale, kv_only):
        """float64 with the kernels' bf16 rounding points; x bf16 [M, width] (returned
        new), caches written in place."""
        m, d = x.shape[0], self.d
        xn = normalized(x, self.norm_in)
        c, s = cos.double()[positions.long()], sin.double()[positions.long()]
        q = rotate64((xn @ self.q_w.double().t()).view(m, -1, d), c, s) * q_scale
        self.k_cache[offset:offset + m] = rotate64((xn @ self.k_w.double().t()).view(m, -1, d), c, s).to(BF16)
        self.v_cache[offset:offset + m] = (xn @ self.v_w.double().t()).view(m, -1, d).to(BF16)
        if kv_only:
            return x
        q = q.to(BF16)
        attn = attention64(q, self.k_cache[:keys], self.v_cache[:keys], bias, attn_scale).to(BF16)
        gate_in = 1.0 if self.gate_in is None else self.gate_in.double()
        x = (x.double() + gate_in * (attn.double().reshape(m, -1) @ self.o_w.double().t())).to(BF16)
        xn = normalized(x, self.norm_post)
        h = (gelu_tanh64(xn @ self.gate_w.double().t()) * (xn @ self.up_w.double().t())).to(BF16)
        gate_post = 1.0 if self.gate_post is None else self.gate_post.double()
        return (x.double() + gate_post * (h.double() @ self.down_w.double().t())).to(BF16)


TINY = dict(width=64, hq=4, hkv=1, d=16, mlp=128)


def tiny_call(m=3, s_max=40, offset=25, keys=28, norm_kind="ada", n_layers=2):
    layers = [TinyLayer(**TINY, s_max=s_max, norm_kind=norm_kind) for _ in range(n_layers)]
    max_pos = 64
    inv = 1.0 / (10000 ** (torch.arange(0, TINY["d"], 2, dtype=torch.float64) / TINY["d"]))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None]
    bias = torch.zeros(keys)
    bias[5:9] = -2.3819763e38  # masked prefix keys (Gemma's big negative)
    kwargs = dict(cos=angles.cos().float(), sin=angles.sin().float(),
                  positions=torch.arange(20, 20 + m, dtype=torch.int32),
                  cache_offset=torch.tensor([offset], dtype=torch.int32), key_bias=bias, keys=keys,
                  q_scale=TINY["d"] ** -0.5, attn_scale=1.0,
                  workspace=expert.expert_layer_workspace(m, keys, num_q_heads=TINY["hq"], num_kv_heads=TINY["hkv"],
                                                          head_dim=TINY["d"], width=TINY["width"], mlp=TINY["mlp"],
                                                          device="cpu"))
    return layers, rnd(m, TINY["width"], dtype=BF16, scale=2.0), kwargs


@pytest.mark.parametrize("norm_kind", ["ada", "rms"])
@pytest.mark.parametrize("kv_only", [False, True])
def test_expert_layers_match_float64(norm_kind, kv_only):
    layers, x, kw = tiny_call(norm_kind=norm_kind)
    ref = x.clone()
    ref_caches = []
    for i, layer in enumerate(layers):
        k0, v0 = layer.k_cache.clone(), layer.v_cache.clone()
        ref = layer.forward64(ref, kw["cos"], kw["sin"], kw["positions"], 25, kw["key_bias"], kw["keys"],
                              kw["q_scale"], kw["attn_scale"], kv_only and i == len(layers) - 1)
        ref_caches.append((layer.k_cache.clone(), layer.v_cache.clone()))
        layer.k_cache.copy_(k0)
        layer.v_cache.copy_(v0)
    res = x.clone()
    out = expert.expert_layers(res, [layer.inputs() for layer in layers], stop_after_kv=kv_only, **kw)
    assert out is res and res.dtype == BF16
    if kv_only:  # only the first layer touched the residual
        assert rel_err(res, ref) < 1e-2 and not torch.equal(res, x)
    else:
        assert rel_err(res, ref) < 1e-2
    for layer, (k_ref, v_ref) in zip(layers, ref_caches):
        assert rel_err(layer.k_cache, k_ref) < 1e-2 and rel_err(layer.v_cache, v_ref) < 1e-2


def test_expert_layer_is_expert_layers_of_one_and_the_five_ops():
    (layer,), x, kw = tiny_call(n_layers=1)
    inputs = layer.inputs()
    caches = (layer.k_cache.clone(), layer.v_cache.clone())
    one = expert.expert_layer(x.clone(), inputs.weights, norm_in=inputs.norm_in, gate_in=inputs.gate_in,
                              norm_post=inputs.norm_post, gate_post=inputs.gate_post, k_cache=layer.k_cache,
                              v_cache=layer.v_cache, **kw)
    layer.k_cache.copy_(caches[0])
    layer.v_cache.copy_(caches[1])
    res, w, m = x.clone(), inputs.weights, x.shape[0]
    q = expert.linear_qkv_rope(res, w.qkv, norm=inputs.norm_in, cos=kw["cos"], sin=kw["sin"],
                               positions=kw["positions"], k_cache=layer.k_cache, v_cache=layer.v_cache,
                               cache_offset=kw["cache_offset"], q_scale=kw["q_scale"])
    keys = kw["keys"]
    attn = expert.decode_attention(q, layer.k_cache[:keys], layer.v_cache[:keys], bias=kw["key_bias"], scale=1.0)
    expert.linear_gated_residual(attn.reshape(m, -1), w.o, res, gate=inputs.gate_in)
    h = expert.linear_gelu_mul(res, w.gate_up, norm=inputs.norm_post)
    expert.linear_gated_residual(h, w.down, res, gate=inputs.gate_post)
    assert torch.equal(one, res)


def test_expert_layer_workspace_bytes():
    pi05 = dict(num_q_heads=8, num_kv_heads=1, head_dim=256, width=1024, mlp=4096)
    # counters 512, q 40960, attention 40960, h 81920, split-K partials 4 x 64 x 1 KiB,
    # attention partials: 5 row blocks x 18 chunks of 32 keys, 16 KiB + 128 B each
    units = 5 * 18
    expected = 256 + 512 + 40960 + 40960 + 81920 + 262144 + units * 16384 + units * 128
    assert expert.expert_layer_workspace_bytes(10, 570, **pi05) == expected
    assert expert.expert_layer_workspace_bytes(16, 1100, **pi05) > expert.expert_layer_workspace_bytes(10, 570, **pi05)
    ws = expert.expert_layer_workspace(10, 570, **pi05, device="cpu")
    assert ws.dtype == torch.uint8 and ws.numel() == expected and not ws.any()
    with pytest.raises(ValueError, match="keys must be a positive int"):
        expert.expert_layer_workspace(10, 0, **pi05, device="cpu")


def _layer_case(**over):
    layers, x, kw = tiny_call(n_layers=1)
    kw = dict(kw, res=x, layers=[layers[0].inputs()])
    kw.update(over)
    return kw


def _with_weights(**weights):
    (layer,), _, _ = tiny_call(n_layers=1)
    inputs = layer.inputs()
    w = inputs.weights
    return [expert.ExpertLayerInputs(expert.ExpertLayerWeights(**{**vars(w), **weights}), inputs.norm_in,
                                     inputs.gate_in, inputs.norm_post, inputs.gate_post, inputs.k_cache,
                                     inputs.v_cache)]


@pytest.mark.parametrize("over, match", [
    (dict(res=rnd(3, 64)), "res has dtype"),
    (dict(res=rnd(3, 128, dtype=BF16)[:, ::2]), "contiguous"),
    (dict(layers=[]), "at least one layer"),
    (dict(layers=[None]), "ExpertLayerInputs"),
    (dict(layers=_with_weights(qkv=rnd(100, 64, dtype=BF16))), "heads of"),
    (dict(layers=_with_weights(o=rnd(64, 32, dtype=BF16))), "weights.o has shape"),
    (dict(layers=_with_weights(down=rnd(64, 128))), "weights.down has dtype"),
    (dict(keys=41), "keys must be an int"),
    (dict(key_bias=torch.zeros(27)), "key_bias has shape"),
    (dict(positions=torch.zeros(3, dtype=torch.int64)), "positions"),
    (dict(cache_offset=torch.zeros(2, dtype=torch.int32)), "one element"),
    (dict(cos=torch.ones(64, 4)), "cos must be"),
    (dict(workspace=torch.zeros(64, dtype=torch.uint8)), "at least"),
])
def test_expert_layers_bad_input_raises_value_error(over, match):
    with pytest.raises(ValueError, match=match):
        expert.expert_layers(**_layer_case(**over))


def test_expert_layers_reject_mismatched_caches_and_norms():
    (a, b), x, kw = tiny_call()
    bad_cache = expert.ExpertLayerInputs(**{**vars(b.inputs()), "k_cache": rnd(39, 1, 16, dtype=BF16)})
    with pytest.raises(ValueError, match="layer 1 k_cache has shape"):
        expert.expert_layers(x, [a.inputs(), bad_cache], **kw)
    bad_norm = expert.ExpertLayerInputs(**{**vars(b.inputs()), "norm_post": None})
    with pytest.raises(ValueError, match="layer 1 norm_post must be RmsNorm or AdaRmsNorm"):
        expert.expert_layers(x, [a.inputs(), bad_norm], **kw)


# --- errors --------------------------------------------------------------------------


def _qkv_args(**over):
    d = 32
    args = dict(x=rnd(2, 64, dtype=BF16), w=rnd(6 * d, 64, dtype=BF16), cos=torch.ones(8, d // 2),
                sin=torch.zeros(8, d // 2), positions=torch.zeros(2, dtype=torch.int32),
                k_cache=torch.zeros(8, 1, d, dtype=BF16), v_cache=torch.zeros(8, 1, d, dtype=BF16),
                cache_offset=torch.zeros(1, dtype=torch.int32))
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
