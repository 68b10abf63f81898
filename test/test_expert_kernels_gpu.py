"""GPU tests of the action-expert kernels (small_m_linear, decode_attention,
velocity_euler_embed) against
their twins (flashrt_core.ops.expert_reference) on random inputs at Pi0.5 expert
shapes: every variant, M in {1, 10, 16, 50, 64}, S in {300, 570, 1100}, outputs and
caches poisoned with NaN before each call, launch-shape variants (split-K clusters, key
splits, row blocks, PDL) and a CUDA graph of whole expert layers replayed on new inputs.

Needs a CUDA device and the extension built with the expert kernels.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from flashrt_core import kernels
from flashrt_core.ops import expert, expert_reference
from flashrt_core.ops.expert import AdaRmsNorm, AttentionLaunch, LinearLaunch, RmsNorm

pytestmark = pytest.mark.gpu

DEV = "cuda"
BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
MS = [1, 10, 16, 50, 64]
HIDDEN, MLP, HEADS, HEAD_DIM = 1024, 4096, 8, 256
TWINS = ["linear", "linear_gated_residual", "linear_gelu_mul", "linear_qkv_rope", "decode_attention",
         "velocity_euler_embed"]
# ||out - ref|| / ||ref||: bf16 outputs round once (kernel and twin may differ by an ulp);
# attention also rounds P to bf16 before P.V
TOL = {BF16: 5e-3, torch.float32: 1e-4}
ATTN_TOL = 1e-2


@pytest.fixture(autouse=True)
def twins(monkeypatch):
    """The ops must take the kernel path: their twins raise here. Returns the real ones."""
    if not kernels.available():
        pytest.fail(f"CUDA is present but the extension is not usable: {kernels.unavailable_reason()}")
    if not hasattr(kernels.module(), "small_m_linear"):
        pytest.fail("the extension was built without the expert kernels (cuda_src/expert_bindings.h)")
    real = {name: getattr(expert_reference, name) for name in TWINS}

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"expert.{name} fell back to its twin on CUDA inputs")
        return call

    for name in TWINS:
        monkeypatch.setattr(expert_reference, name, forbidden(name))
    return SimpleNamespace(**real)


def rnd(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale + 0.05).to(dtype)


def nan_like(t):
    return torch.full_like(t, float("nan"))


def assert_close(out, ref, tol):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    o, r = out.double(), ref.double()
    assert torch.isfinite(o).all(), "an output element was not written (NaN poison left) or is not finite"
    rel = float((o - r).norm() / r.norm())
    assert rel < tol, f"relative error {rel:.2e} >= {tol:.0e}"


def weight(n, k, kind):
    """(w, w_scale) of a random [n, k] weight, bf16 or FP8 with per-row scales."""
    w = rnd(n, k, dtype=torch.float32, scale=k**-0.5)
    if kind == "fp8":
        return expert.quantize_weight_fp8(w)
    return w.to(BF16), None


def make_norm(kind, k):
    if kind == "rms":
        return RmsNorm(rnd(k, dtype=torch.float32, scale=0.2))
    if kind == "ada":
        return AdaRmsNorm(rnd(k, dtype=torch.float32, scale=0.2), rnd(k, dtype=torch.float32, scale=0.2))
    return None


def rope_tables(max_pos, head_dim):
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=DEV, dtype=torch.float64) / head_dim))
    angles = torch.arange(max_pos, device=DEV, dtype=torch.float64)[:, None] * inv[None]
    return angles.cos().float(), angles.sin().float()


# --- small_m_linear ------------------------------------------------------------------


# A norm prologue keeps all of K of M rows in shared memory: K = 4096 fits up to M = 16
# (beyond, the op takes the twin: test_oversized_norm_prologue_takes_the_twin).
STORE_CASES = [(m, w_kind, norm_kind, k, n) for m in MS for w_kind in ("bf16", "fp8")
               for norm_kind in ("none", "rms", "ada") for k, n in ((HIDDEN, 2560), (MLP, HIDDEN))
               if not (norm_kind != "none" and k == MLP and m > 16)]


@pytest.mark.parametrize("m, w_kind, norm_kind, k, n", STORE_CASES)
def test_linear_store(twins, m, w_kind, norm_kind, k, n):
    x = rnd(m, k, scale=2.0)
    w, w_scale = weight(n, k, w_kind)
    norm = make_norm(norm_kind, k)
    bias = rnd(n, dtype=torch.float32) if norm_kind == "none" else None
    out = nan_like(torch.empty(m, n, dtype=BF16, device=DEV))
    expert.linear(x, w, w_scale=w_scale, norm=norm, bias=bias, out=out)
    ref = twins.linear(x, w, w_scale=w_scale, norm=norm, bias=bias)
    assert_close(out, ref, TOL[BF16])


@pytest.mark.parametrize("m", [10, 50])
def test_linear_fp32_input_and_strided_rows(twins, m):
    k, n = HIDDEN, 2560
    x = rnd(m, k + 64, dtype=torch.float32)[:, 32:32 + k]  # row stride k + 64, offset 128 B
    w, _ = weight(n, k, "bf16")
    norm = make_norm("rms", k)
    buf = torch.full((m, n + 16), float("nan"), dtype=BF16, device=DEV)
    out = buf[:, :n]
    expert.linear(x, w, norm=norm, out=out)
    assert torch.isnan(buf[:, n:].float()).all()
    assert_close(out, twins.linear(x, w, norm=norm), TOL[BF16])


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("w_kind", ["bf16", "fp8"])
@pytest.mark.parametrize("res_dtype", [BF16, torch.float32])
@pytest.mark.parametrize("k", [2 * HIDDEN, MLP])
def test_linear_gated_residual(twins, m, w_kind, res_dtype, k):
    n = HIDDEN
    x = rnd(m, k)
    w, w_scale = weight(n, k, w_kind)
    gate = rnd(n, dtype=torch.float32) if k == MLP else None
    residual = rnd(m, n, dtype=res_dtype, scale=4.0)
    expected = twins.linear_gated_residual(x, w, residual.clone(), gate=gate, w_scale=w_scale)
    assert expert.linear_gated_residual(x, w, residual, gate=gate, w_scale=w_scale) is residual
    assert_close(residual, expected, TOL[res_dtype])


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("w_kind", ["bf16", "fp8"])
@pytest.mark.parametrize("norm_kind", ["none", "rms", "ada"])
def test_linear_gelu_mul(twins, m, w_kind, norm_kind):
    k, f = HIDDEN, MLP
    x = rnd(m, k, scale=2.0)
    gate_w = rnd(f, k, dtype=torch.float32, scale=k**-0.5)
    up_w = rnd(f, k, dtype=torch.float32, scale=k**-0.5)
    packed = expert.pack_gate_up(gate_w, up_w)
    w, w_scale = expert.quantize_weight_fp8(packed) if w_kind == "fp8" else (packed.to(BF16), None)
    norm = make_norm(norm_kind, k)
    out = nan_like(torch.empty(m, f, dtype=BF16, device=DEV))
    expert.linear_gelu_mul(x, w, w_scale=w_scale, norm=norm, out=out)
    assert_close(out, twins.linear_gelu_mul(x, w, w_scale=w_scale, norm=norm), TOL[BF16])


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("w_kind", ["bf16", "fp8"])
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_linear_qkv_rope(twins, m, w_kind, num_kv_heads):
    k, s_max, max_pos = HIDDEN, 1100, 1200
    x = rnd(m, k, scale=2.0)
    q_w = rnd(HEADS * HEAD_DIM, k, dtype=torch.float32, scale=k**-0.5)
    k_w = rnd(num_kv_heads * HEAD_DIM, k, dtype=torch.float32, scale=k**-0.5)
    v_w = rnd(num_kv_heads * HEAD_DIM, k, dtype=torch.float32, scale=k**-0.5)
    packed = expert.pack_qkv_rope(q_w, k_w, v_w, HEAD_DIM)
    w, w_scale = expert.quantize_weight_fp8(packed) if w_kind == "fp8" else (packed.to(BF16), None)
    norm = make_norm("ada", k)
    cos, sin = rope_tables(max_pos, HEAD_DIM)
    positions = torch.randint(0, max_pos, (m,), device=DEV, dtype=torch.int32)
    offset = int(torch.randint(0, s_max - m + 1, ()).item())
    cache_offset = torch.tensor([offset], device=DEV, dtype=torch.int32)
    kc = torch.full((s_max, num_kv_heads, HEAD_DIM), float("nan"), dtype=BF16, device=DEV)
    vc, kc_ref, vc_ref = kc.clone(), kc.clone(), kc.clone()
    q_out = torch.full((m, HEADS, HEAD_DIM), float("nan"), dtype=BF16, device=DEV)
    common = dict(cos=cos, sin=sin, positions=positions, cache_offset=cache_offset, q_scale=HEAD_DIM**-0.5,
                  w_scale=w_scale, norm=norm)
    expert.linear_qkv_rope(x, w, k_cache=kc, v_cache=vc, q_out=q_out, **common)
    q_ref = twins.linear_qkv_rope(x, w, k_cache=kc_ref, v_cache=vc_ref, **common)
    assert_close(q_out, q_ref, TOL[BF16])
    rows = slice(offset, offset + m)
    assert_close(kc[rows], kc_ref[rows], TOL[BF16])
    assert_close(vc[rows], vc_ref[rows], TOL[BF16])
    untouched = torch.ones(s_max, dtype=torch.bool, device=DEV)
    untouched[rows] = False
    assert torch.isnan(kc[untouched].float()).all() and torch.isnan(vc[untouched].float()).all()


@pytest.mark.parametrize("m", [8, 64])
def test_fp8_weights_widen_exactly(m):
    """Every finite E4M3 value (subnormals, zeros of both signs, +-448) reaches the MMA
    unchanged: with one-hot x rows, y[i, n] = W[n, i] * scale[n] exactly in bf16."""
    k, n = 512, 64
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F]  # drop the two NaN codes
    raw = torch.zeros(n, k, dtype=torch.uint8)
    flat = codes.repeat((n * m) // codes.numel() + 1)[: n * m].to(torch.uint8)
    raw[:, :m] = flat.view(n, m)
    w = raw.to(DEV).view(FP8)
    scale = torch.ones(n, device=DEV)
    x = torch.zeros(m, k, dtype=BF16, device=DEV)
    x[torch.arange(m), torch.arange(m)] = 1.0
    out = expert.linear(x, w, w_scale=scale, out=nan_like(torch.empty(m, n, dtype=BF16, device=DEV)))
    expected = w.float()[:, :m].t().to(BF16)
    assert torch.equal(out.float(), expected.float())  # -0 weights sum to +0: compare values


@pytest.mark.parametrize("k, n", [(MLP, HIDDEN), (2 * HIDDEN, HIDDEN), (HIDDEN, 2560)])
@pytest.mark.parametrize("w_kind", ["bf16", "fp8"])
def test_linear_split_k_and_pdl_agree_and_repeat_bitwise(twins, k, n, w_kind):
    m = 10
    x = rnd(m, k)
    w, w_scale = weight(n, k, w_kind)
    ref = twins.linear(x, w, w_scale=w_scale)
    chunk = 64 if w_kind == "fp8" else 32
    for split in (1, 2, 4, 8):
        if k % (split * 8 * chunk):
            continue
        for launch in (LinearLaunch(split_k=split), LinearLaunch(split_k=split, pdl=True, max_groups=7)):
            first = expert.linear(x, w, w_scale=w_scale, out=nan_like(ref), launch=launch)
            again = expert.linear(x, w, w_scale=w_scale, out=nan_like(ref), launch=launch)
            assert_close(first, ref, TOL[BF16])
            assert torch.equal(first, again), f"split {split}: results differ between runs"


def test_oversized_norm_prologue_takes_the_twin():
    x = rnd(64, MLP)
    w, _ = weight(HIDDEN, MLP, "bf16")
    with pytest.raises(AssertionError, match="fell back to its twin"):
        expert.linear(x, w, norm=make_norm("rms", MLP))


def test_linear_on_side_stream(twins):
    x = rnd(10, HIDDEN)
    w, _ = weight(2560, HIDDEN, "bf16")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = expert.linear(x, w)
    stream.synchronize()
    assert_close(out, twins.linear(x, w), TOL[BF16])


def test_linear_rejects_bad_launch_shape():
    x = rnd(10, HIDDEN)
    w, _ = weight(256, HIDDEN, "bf16")
    with pytest.raises(ValueError, match="split_k"):
        expert.linear(x, w, launch=LinearLaunch(split_k=3))
    with pytest.raises(ValueError, match="whole rows"):
        expert.linear(x, w, norm=make_norm("rms", HIDDEN), launch=LinearLaunch(split_k=2))


# --- decode_attention ------------------------------------------------------------------


def padded_bias(m, s, per_token=False):
    """Key padding like the Pi0.5 prefix: a masked stretch in the middle and at the end."""
    bias = torch.zeros((m, s) if per_token else (s,), device=DEV)
    bias[..., s // 3:s // 3 + 17] = float("-inf")
    bias[..., s - s // 10:] = float("-inf")
    return bias


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("s", [300, 570, 1100])
def test_decode_attention(twins, m, s):
    q = rnd(m, HEADS, HEAD_DIM)
    k_cache, v_cache = rnd(s + 7, 1, HEAD_DIM), rnd(s + 7, 1, HEAD_DIM)  # a cache longer than S
    bias = padded_bias(m, s)
    out = nan_like(q)
    expert.decode_attention(q, k_cache[:s], v_cache[:s], bias=bias, out=out)
    ref = twins.decode_attention(q, k_cache[:s], v_cache[:s], bias=bias, scale=HEAD_DIM**-0.5)
    assert_close(out, ref, ATTN_TOL)


@pytest.mark.parametrize("launch", [AttentionLaunch(splits=1), AttentionLaunch(splits=2),
                                    AttentionLaunch(splits=8, rows_per_block=32),
                                    AttentionLaunch(rows_per_block=64, pdl=True), AttentionLaunch(splits=16)])
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_decode_attention_launch_shapes_and_masks(twins, launch, num_kv_heads):
    m, s = 10, 570
    cap = 16  # non-portable cluster size; skip where the device does not co-schedule it
    q = rnd(m, HEADS, HEAD_DIM, scale=3.0)
    k, v = rnd(s, num_kv_heads, HEAD_DIM), rnd(s, num_kv_heads, HEAD_DIM)
    bias = padded_bias(m, s, per_token=True)
    bias[3] = float("-inf")  # a query token with no valid key
    out = nan_like(q)
    try:
        expert.decode_attention(q, k, v, bias=bias, scale=0.07, out=out, launch=launch)
    except ValueError as exc:
        if launch.splits == cap and "largest cluster" in str(exc):
            pytest.skip(str(exc))
        raise
    ref = twins.decode_attention(q, k, v, bias=bias, scale=0.07)
    assert torch.equal(out[3].float(), torch.zeros(HEADS, HEAD_DIM, device=DEV))
    assert_close(out, ref, ATTN_TOL)


@pytest.mark.parametrize("stable_keys", [1, 63, 64, 300, 560, 569, 570, 10_000])
@pytest.mark.parametrize("launch", [AttentionLaunch(pdl=True), AttentionLaunch(splits=2, rows_per_block=32, pdl=True),
                                    AttentionLaunch(splits=1)])
def test_decode_attention_stable_keys_split_the_loads_not_the_result(stable_keys, launch):
    """Rows below stable_keys are loaded before the dependency wait, the rest after it:
    every split point (mid-tile, tile edge, past the end) gives the bit-identical output."""
    m, s = 10, 570
    q = rnd(m, HEADS, HEAD_DIM, scale=3.0)
    k, v = rnd(s, 1, HEAD_DIM), rnd(s, 1, HEAD_DIM)
    bias = padded_bias(m, s)
    plain = expert.decode_attention(q, k, v, bias=bias, out=nan_like(q), launch=launch)
    split = expert.decode_attention(q, k, v, bias=bias, out=nan_like(q), launch=launch, stable_keys=stable_keys)
    assert torch.equal(split, plain)


def test_decode_attention_without_bias_and_few_keys(twins):
    q = rnd(16, HEADS, HEAD_DIM)
    for s in (1, 63, 65):
        k, v = rnd(s, 1, HEAD_DIM), rnd(s, 1, HEAD_DIM)
        out = expert.decode_attention(q, k, v, out=nan_like(q))
        assert_close(out, twins.decode_attention(q, k, v), ATTN_TOL)


# --- a captured expert layer ---------------------------------------------------------


class Layer:
    """Random Pi0.5-expert-shaped layer weights (packed; optionally FP8)."""

    def __init__(self, w_kind):
        def prep(w):
            return expert.quantize_weight_fp8(w) if w_kind == "fp8" else (w.to(BF16), None)

        def lin(n, k):
            return rnd(n, k, dtype=torch.float32, scale=k**-0.5)

        self.qkv = prep(expert.pack_qkv_rope(lin(HEADS * HEAD_DIM, HIDDEN), lin(HEAD_DIM, HIDDEN),
                                             lin(HEAD_DIM, HIDDEN), HEAD_DIM))
        self.o = prep(lin(HIDDEN, HEADS * HEAD_DIM))
        self.gate_up = prep(expert.pack_gate_up(lin(MLP, HIDDEN), lin(MLP, HIDDEN)))
        self.down = prep(lin(HIDDEN, MLP))
        self.mod = [rnd(HIDDEN, dtype=torch.float32, scale=0.2) for _ in range(6)]  # scale, shift, gate x 2


def run_layer(ops, layer, x, st, pdl):
    """One expert layer through `ops` (the kernels' module or the twins' namespace)."""
    lin, att = LinearLaunch(pdl=pdl), AttentionLaunch(pdl=pdl)
    kw = {} if ops is not expert else {"launch": lin}
    s1, sh1, g1, s2, sh2, g2 = layer.mod
    ops.linear_qkv_rope(x, layer.qkv[0], w_scale=layer.qkv[1], norm=AdaRmsNorm(s1, sh1), cos=st.cos, sin=st.sin,
                        positions=st.positions, k_cache=st.kc, v_cache=st.vc, cache_offset=st.offset, q_out=st.q,
                        q_scale=HEAD_DIM**-0.5, **kw)
    ops.decode_attention(st.q, st.kc[:st.s], st.vc[:st.s], bias=st.bias, scale=1.0, out=st.attn,
                         **({} if ops is not expert else {"launch": att}))
    ops.linear_gated_residual(st.attn.view(x.shape[0], -1), layer.o[0], x, gate=g1, w_scale=layer.o[1], **kw)
    ops.linear_gelu_mul(x, layer.gate_up[0], w_scale=layer.gate_up[1], norm=AdaRmsNorm(s2, sh2), out=st.h, **kw)
    ops.linear_gated_residual(st.h, layer.down[0], x, gate=g2, w_scale=layer.down[1], **kw)


def make_state(m, s_max=640, prefix=520):
    cos, sin = rope_tables(1024, HEAD_DIM)
    st = SimpleNamespace(cos=cos, sin=sin, s=prefix + m)
    st.positions = torch.arange(prefix, prefix + m, device=DEV, dtype=torch.int32)
    st.offset = torch.tensor([prefix], device=DEV, dtype=torch.int32)
    st.kc, st.vc = rnd(s_max, 1, HEAD_DIM), rnd(s_max, 1, HEAD_DIM)
    st.bias = padded_bias(m, prefix + m)
    st.bias[prefix:] = 0.0
    st.q = torch.empty(m, HEADS, HEAD_DIM, dtype=BF16, device=DEV)
    st.attn = torch.empty_like(st.q)
    st.h = torch.empty(m, MLP, dtype=BF16, device=DEV)
    return st


@pytest.mark.parametrize("w_kind", ["bf16", "fp8"])
@pytest.mark.parametrize("pdl", [False, True])
def test_expert_layers_graph_replay(twins, w_kind, pdl):
    m, n_layers = 10, 2
    layers = [Layer(w_kind) for _ in range(n_layers)]
    st = make_state(m)
    x = torch.empty(m, HIDDEN, dtype=torch.float32, device=DEV)
    x.copy_(rnd(m, HIDDEN, dtype=torch.float32))
    for layer in layers:  # warm-up (module load, smem attributes) outside capture
        run_layer(expert, layer, x.clone(), st, pdl)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        for layer in layers:
            run_layer(expert, layer, x, st, pdl)
    torch.cuda.current_stream().wait_stream(side)
    ops = SimpleNamespace(**vars(twins))
    for trial in range(2):
        x0 = rnd(m, HIDDEN, dtype=torch.float32, scale=1.0 + trial)
        st.offset.fill_(500 + 3 * trial)
        ref_st = SimpleNamespace(**vars(st))
        ref_st.kc, ref_st.vc = st.kc.clone(), st.vc.clone()
        ref_st.q, ref_st.attn, ref_st.h = st.q.clone(), st.attn.clone(), st.h.clone()
        x_ref = x0.clone()
        for layer in layers:
            run_layer(ops, layer, x_ref, ref_st, pdl)
        x.copy_(x0)
        st.h.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(x, x_ref, 2e-3)
        assert_close(st.kc, ref_st.kc, TOL[BF16])


# --- velocity_euler_embed --------------------------------------------------------------


class ActionHead:
    """Random action head of a flow step: final norm, velocity head, action embedding."""

    def __init__(self, dim, actions, norm_kind):
        self.norm = make_norm(norm_kind, dim)
        self.w_out = rnd(actions, dim, dtype=torch.float32, scale=dim**-0.5)
        self.b_out = rnd(actions, dtype=torch.float32, scale=0.1)
        self.w_in = rnd(dim, actions, dtype=torch.float32, scale=actions**-0.5)
        self.b_in = rnd(dim, dtype=torch.float32, scale=0.1)

    def run(self, op, x_t, res, out, mode, launch=None):
        velocity, embed = mode != "embed", mode != "velocity"
        return op(x_t, res=res if velocity else None, norm=self.norm, w_out=self.w_out, b_out=self.b_out, dt=-0.1,
                  w_in=self.w_in if embed else None, b_in=self.b_in, out=out if embed else None, launch=launch)


# above 16 rows the op splits them over clusters: 17 -> 9 + 8, 33 -> 3 x 11, 50 -> 3 x 13 + 11
HEAD_SHAPES = [(1, HIDDEN, 32), (10, HIDDEN, 32), (16, HIDDEN, 32), (17, HIDDEN, 32), (50, HIDDEN, 32),
               (64, HIDDEN, 32), (10, 128, 8), (7, 384, 12), (33, 384, 12)]


@pytest.mark.parametrize("rows, dim, actions", HEAD_SHAPES)
@pytest.mark.parametrize("norm_kind", ["rms", "ada"])
@pytest.mark.parametrize("mode", ["both, out = res", "both", "velocity", "embed"])
def test_velocity_euler_embed(twins, rows, dim, actions, norm_kind, mode):
    head = ActionHead(dim, actions, norm_kind)
    res = rnd(rows, dim, scale=3.0)
    x_t = rnd(rows, actions, dtype=torch.float32)
    out = res if mode.endswith("= res") else nan_like(res)
    ref_res, ref_x, ref_out = res.clone(), x_t.clone(), out.clone()
    head.run(twins.velocity_euler_embed, ref_x, ref_res, ref_res if out is res else ref_out, mode.split(",")[0])
    head.run(expert.velocity_euler_embed, x_t, res, out, mode.split(",")[0])
    assert_close(x_t, ref_x, 1e-5)
    if mode == "velocity":
        assert torch.isnan(out).all(), "no embedding was asked for, but out was written"
        torch.testing.assert_close(res, ref_res, rtol=0, atol=0)
    else:
        assert_close(out, ref_res if out is res else ref_out, TOL[BF16])


@pytest.mark.parametrize("rows", [10, 50])
def test_velocity_euler_embed_strided_rows_and_pdl_in_a_graph(twins, rows):
    """The runtime's case: res / out are the action rows of a wider residual buffer, the op
    runs with PDL right after the kernel that wrote res, inside a CUDA graph; replayed on
    new inputs it matches the twin (one cluster at 10 rows, four at 50)."""
    actions = 32
    head = ActionHead(HIDDEN, actions, "ada")
    stream_rows = torch.empty(rows + 6, HIDDEN + 64, dtype=BF16, device=DEV)  # row stride 1088
    res = stream_rows[3:3 + rows, :HIDDEN]
    source = torch.empty(rows, HIDDEN, dtype=BF16, device=DEV)
    x_t = torch.empty(rows, actions, dtype=torch.float32, device=DEV)

    def step():
        res.copy_(source)  # the producer the PDL launch must wait for
        head.run(expert.velocity_euler_embed, x_t, res, res, "both", launch=LinearLaunch(pdl=True))

    source.copy_(rnd(rows, HIDDEN))
    x_t.copy_(rnd(rows, actions, dtype=torch.float32))
    step()  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    for trial in range(3):
        source.copy_(rnd(rows, HIDDEN, scale=1.0 + trial))
        x0 = rnd(rows, actions, dtype=torch.float32)
        ref_x, ref_res = x0.clone(), source.clone()
        head.run(twins.velocity_euler_embed, ref_x, ref_res, ref_res, "both")
        x_t.copy_(x0)
        res.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(x_t, ref_x, 1e-5)
        assert_close(res, ref_res, TOL[BF16])


def test_velocity_euler_embed_takes_the_twin_beyond_its_shapes(twins, monkeypatch):
    """65 rows (or D = 2048) exceed the kernel: the op runs the twin, same result."""
    calls = []
    monkeypatch.setattr(expert_reference, "velocity_euler_embed",
                        lambda *a, **k: calls.append(1) or twins.velocity_euler_embed(*a, **k))
    for rows, dim in ((65, HIDDEN), (10, 2048)):
        head = ActionHead(dim, 32, "rms")
        res, x_t = rnd(rows, dim), rnd(rows, 32, dtype=torch.float32)
        head.run(expert.velocity_euler_embed, x_t, res, res, "both")
    assert len(calls) == 2


def test_kernels_report_sm90_features_or_fall_back():
    """split_k > 1 and key splits use thread-block clusters; pre-sm_90 devices get split 1."""
    major, _ = torch.cuda.get_device_capability()
    x = rnd(10, MLP)
    w, _ = weight(HIDDEN, MLP, "bf16")
    if major >= 9:
        expert.linear(x, w, launch=LinearLaunch(split_k=4))
    else:
        with pytest.raises(ValueError, match="clusters"):
            expert.linear(x, w, launch=LinearLaunch(split_k=4))
    assert math.isfinite(float(expert.linear(x, w).float().sum()))
