"""GPU tests of the persistent expert-layer kernel (flashrt_core.ops.expert.expert_layer /
expert_layers, cuda_src/expert_layer.cu) against its twin, the composition of the five
small-M twins: random Pi0.5 (adaRMS, gates) and Pi0 (RMS, no gates) layers, M in
{1, 10, 16}, keys in {300, 570, 1100} with masked keys, the workspace and the new cache
rows poisoned before each call; launch shapes that must not change a bit; CUDA graphs
of 18 chained layers against 18 chained five-call sequences, replayed bit-stably.

Needs a CUDA device (sm_90+) and the extension built with expert_layer.cu.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flashrt_core import kernels
from flashrt_core.ops import expert, expert_reference
from flashrt_core.ops.expert import (AdaRmsNorm, AttentionLaunch, ExpertLayerInputs, ExpertLayerLaunch,
                                     ExpertLayerWeights, LinearLaunch, RmsNorm)

pytestmark = pytest.mark.gpu

DEV = "cuda"
BF16 = torch.bfloat16
HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM = 1024, 4096, 8, 1, 256
MASKED = -2.3819763e38  # Gemma's big negative, as the runtime's key bias holds it
DIMS = dict(num_q_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, width=HIDDEN, mlp=MLP)
# Workspace layout (cuda_src/expert_layer.cu workspace_layout): the grid barrier counter
# at 0 (bit 31 flips at every barrier, the low 31 bits return to zero), the split-K
# counters in [256, 768) (all return to zero), the data regions from 768 on.
BARRIER_BYTES = slice(0, 4)
SPLIT_K_COUNTERS = slice(256, 768)
DATA_START = 768
TOL = 5e-3  # ||out - ref|| / ||ref|| of one layer (bf16 roundings, attention P in bf16)


@pytest.fixture(autouse=True)
def twin():
    """The kernel path must be taken: the layer twin raises here. Returns the real one."""
    if not kernels.available() or not hasattr(kernels.module(), "expert_layer"):
        pytest.fail(f"the extension lacks expert_layer ({kernels.unavailable_reason()})")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("expert_layer needs sm_90+")
    real = expert_reference.expert_layers

    def forbidden(*args, **kwargs):
        raise AssertionError("expert.expert_layers fell back to its twin on CUDA inputs")

    expert_reference.expert_layers = forbidden
    yield real
    expert_reference.expert_layers = real


def rnd(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale + 0.02).to(dtype)


def lin(n, k):
    return rnd(n, k, dtype=torch.float32, scale=k**-0.5)


def rope_tables(max_pos):
    inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, device=DEV, dtype=torch.float64) / HEAD_DIM))
    angles = torch.arange(max_pos, device=DEV, dtype=torch.float64)[:, None] * inv[None]
    return angles.cos().float(), angles.sin().float()


def make_layer(pi05: bool, cache_rows: int) -> ExpertLayerInputs:
    weights = ExpertLayerWeights(
        expert.pack_qkv_rope(lin(HEADS * HEAD_DIM, HIDDEN), lin(HEAD_DIM, HIDDEN), lin(HEAD_DIM, HIDDEN),
                             HEAD_DIM).to(BF16),
        lin(HIDDEN, HEADS * HEAD_DIM).to(BF16),
        expert.pack_gate_up(lin(MLP, HIDDEN), lin(MLP, HIDDEN)).to(BF16),
        lin(HIDDEN, MLP).to(BF16))

    def vec(scale):
        return rnd(HIDDEN, dtype=torch.float32, scale=scale)

    if pi05:
        norms = (AdaRmsNorm(vec(0.2), vec(0.2)), vec(0.5), AdaRmsNorm(vec(0.2), vec(0.2)), vec(0.5))
    else:
        norms = (RmsNorm(vec(0.2)), None, RmsNorm(vec(0.2)), None)
    return ExpertLayerInputs(weights, *norms, rnd(cache_rows, KV_HEADS, HEAD_DIM), rnd(cache_rows, KV_HEADS, HEAD_DIM))


class Step:
    """Per-call inputs of an expert pass: `m` action tokens at cache rows
    [keys - m, keys), a prefix with a masked stretch (a whole attention chunk and more)."""

    def __init__(self, m: int, keys: int, cache_rows: int | None = None):
        self.m, self.keys = m, keys
        self.cache_rows = cache_rows or keys + 24
        self.cos, self.sin = rope_tables(self.cache_rows + 64)
        self.positions = torch.arange(keys - m, keys, device=DEV, dtype=torch.int32) + 3
        self.cache_offset = torch.tensor([keys - m], device=DEV, dtype=torch.int32)
        self.key_bias = torch.zeros(keys, device=DEV)
        self.key_bias[keys // 5:keys // 5 + 70] = MASKED
        self.key_bias[keys - m - 9:keys - m] = MASKED
        self.workspace = expert.expert_layer_workspace(m, keys, **DIMS, device=DEV)

    def kwargs(self):
        return dict(cos=self.cos, sin=self.sin, positions=self.positions, cache_offset=self.cache_offset,
                    key_bias=self.key_bias, keys=self.keys, q_scale=HEAD_DIM**-0.5, attn_scale=1.0)

    def poison_workspace(self):
        self.workspace[DATA_START:] = 0xFF  # bf16 / fp32 NaN: reads of anything unwritten show

    def assert_counters_at_rest(self):
        barrier = int(self.workspace[BARRIER_BYTES].view(torch.int32)) & 0x7FFFFFFF
        assert barrier == 0, f"the grid barrier counter holds {barrier} arrivals after the launch"
        assert not self.workspace[SPLIT_K_COUNTERS].any(), "the kernel left a split-K counter non-zero"

    def poison_new_rows(self, layers):
        rows = slice(self.keys - self.m, self.keys)
        for layer in layers:
            layer.k_cache[rows] = float("nan")
            layer.v_cache[rows] = float("nan")


def rel_err(out, ref):
    o, r = out.double(), ref.double()
    assert torch.isfinite(o).all(), "a NaN / inf in the kernel's output (unwritten or masked-key NaN)"
    return float((o - r).norm() / r.norm())


def clone_layers(layers):
    return [ExpertLayerInputs(**{**vars(layer), "k_cache": layer.k_cache.clone(), "v_cache": layer.v_cache.clone()})
            for layer in layers]


def run_kernel(res, layers, step, launch=None, **extra):
    return expert.expert_layers(res, layers, workspace=step.workspace, launch=launch, **step.kwargs(), **extra)


@pytest.mark.parametrize("pi05", [True, False], ids=["pi05", "pi0"])
@pytest.mark.parametrize("m", [1, 10, 16])
@pytest.mark.parametrize("keys", [300, 570, 1100])
def test_expert_layer_matches_twin(twin, pi05, m, keys):
    step = Step(m, keys)
    layers = [make_layer(pi05, step.cache_rows)]
    step.poison_new_rows(layers)
    ref_layers = clone_layers(layers)
    x = rnd(m, HIDDEN, scale=2.0)
    ref = twin(x.clone(), ref_layers, **step.kwargs())
    prefix_k = layers[0].k_cache[:keys - m].clone()
    step.poison_workspace()
    res = x.clone()
    layer = layers[0]
    out = expert.expert_layer(res, layer.weights, norm_in=layer.norm_in, gate_in=layer.gate_in,
                              norm_post=layer.norm_post, gate_post=layer.gate_post, k_cache=layer.k_cache,
                              v_cache=layer.v_cache, workspace=step.workspace, **step.kwargs())
    torch.cuda.synchronize()
    assert out is res
    assert rel_err(res, ref) < TOL
    rows = slice(keys - m, keys)
    assert rel_err(layer.k_cache[rows], ref_layers[0].k_cache[rows]) < TOL
    assert rel_err(layer.v_cache[rows], ref_layers[0].v_cache[rows]) < TOL
    assert torch.equal(layer.k_cache[:keys - m], prefix_k)
    step.assert_counters_at_rest()


@pytest.mark.parametrize("pi05", [True, False], ids=["pi05", "pi0"])
def test_stacked_layers_and_kv_only_last_layer(twin, pi05):
    """One launch of 3 layers, the last stopping after its K / V (Pi0's state pass)."""
    m, keys = 10, 570
    step = Step(m, keys)
    layers = [make_layer(pi05, step.cache_rows) for _ in range(3)]
    step.poison_new_rows(layers)
    ref_layers = clone_layers(layers)
    x = rnd(m, HIDDEN, scale=2.0)
    ref = twin(x.clone(), ref_layers, stop_after_kv=True, **step.kwargs())
    step.poison_workspace()
    res = x.clone()
    run_kernel(res, layers, step, stop_after_kv=True)
    torch.cuda.synchronize()
    assert rel_err(res, ref) < 2 * TOL
    rows = slice(keys - m, keys)
    for layer, ref_layer in zip(layers, ref_layers):
        assert rel_err(layer.k_cache[rows], ref_layer.k_cache[rows]) < 2 * TOL
        assert rel_err(layer.v_cache[rows], ref_layer.v_cache[rows]) < 2 * TOL


@pytest.mark.parametrize("launch", [
    ExpertLayerLaunch(ring_slots=2, in_flight=1), ExpertLayerLaunch(ring_slots=3),
    ExpertLayerLaunch(ring_slots=5, in_flight=5), ExpertLayerLaunch(grid=66), ExpertLayerLaunch(grid=101),
    ExpertLayerLaunch(cooperative=False), ExpertLayerLaunch(pdl=True), ExpertLayerLaunch(sc_fences=True),
    ExpertLayerLaunch(prefetch=False), ExpertLayerLaunch(grid=66, merge_lanes=4)],
    ids=["ring2x1", "ring3", "ring5x5", "grid66", "grid101", "noncoop", "pdl", "sc_fences", "no_prefetch",
         "grid66_lanes4"])
def test_launch_shapes_do_not_change_a_bit(launch):
    """Ring depth, grid size (101: K slices change within a block's items), launch
    attributes, fences and prefetches move work between blocks and time, never the
    arithmetic."""
    m, keys = 10, 570
    step = Step(m, keys)
    layers = [make_layer(True, step.cache_rows) for _ in range(2)]
    x = rnd(m, HIDDEN, scale=2.0)
    base = x.clone()
    run_kernel(base, clone_layers(layers), step)
    step.poison_workspace()
    res = x.clone()
    run_kernel(res, layers, step, launch=launch)
    torch.cuda.synchronize()
    assert torch.equal(res, base)
    step.assert_counters_at_rest()


@pytest.mark.parametrize("launch", [
    ExpertLayerLaunch(attn_chunk=64), ExpertLayerLaunch(attn_chunk=96), ExpertLayerLaunch(merge_lanes=1),
    ExpertLayerLaunch(merge_lanes=2), ExpertLayerLaunch(merge_lanes=8)],
    ids=["chunk64", "chunk96", "lanes1", "lanes2", "lanes8"])
def test_attention_splits_and_merge_orders(twin, launch):
    """Key chunk sizes and merge orders (35 chunks at 32 keys: more than one batch of
    loads per lane for 1 and 2 lanes) against the twin; each is stable across grids."""
    m, keys = 10, 1100
    step = Step(m, keys)
    layers = [make_layer(True, step.cache_rows)]
    x = rnd(m, HIDDEN, scale=2.0)
    ref = twin(x.clone(), clone_layers(layers), **step.kwargs())
    res = x.clone()
    run_kernel(res, clone_layers(layers), step, launch=launch)
    torch.cuda.synchronize()
    assert rel_err(res, ref) < TOL
    other_grid = x.clone()
    run_kernel(other_grid, clone_layers(layers), step, launch=dataclasses.replace(launch, grid=101))
    torch.cuda.synchronize()
    assert torch.equal(other_grid, res)


def test_bad_merge_lanes_raise():
    step = Step(10, 300)
    with pytest.raises(ValueError, match="merge_lanes"):
        run_kernel(rnd(10, HIDDEN), [make_layer(True, step.cache_rows)], step, launch=ExpertLayerLaunch(merge_lanes=3))


def test_oversized_m_takes_the_twin():
    step = Step(17, 300)
    layers = [make_layer(True, step.cache_rows)]
    with pytest.raises(AssertionError, match="fell back to its twin"):
        run_kernel(rnd(17, HIDDEN), layers, step)
    assert not expert.expert_layer_supported(17, **DIMS, device=DEV)
    assert expert.expert_layer_supported(16, **DIMS, device=DEV)


def test_workspace_size_matches_the_kernel():
    for m, keys in ((1, 300), (10, 570), (16, 1100)):
        assert expert.expert_layer_workspace_bytes(m, keys, **DIMS) == kernels.module().expert_layer_workspace_bytes(
            m=m, keys=keys, num_q_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, hidden=HIDDEN, mlp=MLP)
    step = Step(10, 570)
    small = torch.zeros(step.workspace.numel() - 256, dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match="workspace"):
        expert.expert_layers(rnd(10, HIDDEN), [make_layer(True, step.cache_rows)], workspace=small, **step.kwargs())


def five_calls(res, layer, step, q, attn, h):
    """The runtime's current per-layer sequence (PiGraphRuntime._expert_small_m)."""
    lin, att = LinearLaunch(pdl=True), AttentionLaunch(pdl=True)
    w, m, keys = layer.weights, res.shape[0], step.keys
    expert.linear_qkv_rope(res, w.qkv, norm=layer.norm_in, cos=step.cos, sin=step.sin, positions=step.positions,
                           k_cache=layer.k_cache, v_cache=layer.v_cache, cache_offset=step.cache_offset, q_out=q,
                           q_scale=HEAD_DIM**-0.5, launch=lin)
    expert.decode_attention(q, layer.k_cache[:keys], layer.v_cache[:keys], bias=step.key_bias, scale=1.0, out=attn,
                            launch=att)
    expert.linear_gated_residual(attn.view(m, -1), w.o, res, gate=layer.gate_in, launch=lin)
    expert.linear_gelu_mul(res, w.gate_up, norm=layer.norm_post, out=h, launch=lin)
    expert.linear_gated_residual(h, w.down, res, gate=layer.gate_post, launch=lin)


def capture(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside capture (module load, shared-memory attributes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        fn()
    torch.cuda.synchronize()
    return graph


@pytest.mark.parametrize("mode", ["per_layer", "per_layer_pdl", "per_layer_noncoop", "one_launch"])
def test_graph_of_18_chained_layers(mode):
    """18 layers chained on one residual in one CUDA graph against the same 18 layers as
    captured five-call sequences; then replays on new inputs are bit-stable."""
    m, keys, depth = 10, 570, 18
    step = Step(m, keys)
    layers = [make_layer(True, step.cache_rows) for _ in range(depth)]
    ref_layers = clone_layers(layers)
    x = torch.empty(m, HIDDEN, dtype=BF16, device=DEV)
    x_ref = torch.empty_like(x)
    q = torch.empty(m, HEADS, HEAD_DIM, dtype=BF16, device=DEV)
    attn, h = torch.empty_like(q), torch.empty(m, MLP, dtype=BF16, device=DEV)
    launch = ExpertLayerLaunch(pdl=mode == "per_layer_pdl", cooperative=mode != "per_layer_noncoop")

    def fused():
        if mode == "one_launch":
            run_kernel(x, layers, step, launch=launch)
        else:
            for layer in layers:
                run_kernel(x, [layer], step, launch=launch)

    def chained():
        for layer in ref_layers:
            five_calls(x_ref, layer, step, q, attn, h)

    x.copy_(rnd(m, HIDDEN, scale=2.0))
    graph, ref_graph = capture(fused), capture(chained)
    for trial in range(2):
        x0 = rnd(m, HIDDEN, scale=1.0 + trial)
        step.cache_offset.fill_(keys - m - trial)  # the graph reads the offset on the device
        x.copy_(x0)
        x_ref.copy_(x0)
        graph.replay()
        ref_graph.replay()
        torch.cuda.synchronize()
        first = x.clone()
        assert rel_err(first, x_ref) < 3e-2
        for layer, ref_layer in zip(layers[::6], ref_layers[::6]):
            rows = slice(keys - m - trial, keys - trial)
            assert rel_err(layer.k_cache[rows], ref_layer.k_cache[rows]) < 3e-2
        x.copy_(x0)
        step.cache_offset.fill_(keys - m - trial)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(x, first), "replays of the same inputs differ"
