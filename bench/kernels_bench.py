"""Microbenchmark of the CUDA kernels against their PyTorch twins at Pi0.5 shapes.

Each case is captured in a CUDA graph that calls the op once per input set, the sets
rotating so the bytes come from HBM rather than L2 where a set is large; the graph is
replayed and the per-call median reported, with the achieved bandwidth (bytes each
call must move / time) against the H100 copy rate. The twin runs the same way (its
torch ops captured in a graph too), so the ratio is launch-for-launch fair.

    python bench/kernels_bench.py [--peak-gbs 3000] [--replays 50] [--only NAME]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the source tree (in-place build)
from bench_common import require_cuda_and_kernels  # noqa: E402
from flashrt_core import kernels, ops  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
L2_FLUSH_BYTES = 120 << 20  # rotate input sets until a pass moves > 2x the H100's 50 MB L2
MAX_SETS = 32


def rnd(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale + 0.1).to(dtype)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rope_tables(max_pos, head_dim):
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=DEV) / head_dim)
    angles = torch.arange(max_pos, dtype=torch.float32, device=DEV)[:, None] * inv_freq
    return angles.cos(), angles.sin()


# Each case: name -> (make one input set -> (call, bytes moved)).


def norm_case(rows, dim, kind, fp8=False):
    def make():
        x, res = rnd(rows, dim), rnd(rows, dim)
        gate, scale, shift, w = (rnd(dim, scale=0.3) for _ in range(4))
        out = torch.empty(rows, dim, dtype=FP8 if fp8 else BF16, device=DEV)
        out_scale = torch.tensor([0.02], device=DEV) if fp8 else None
        calls = {
            "rms_norm": (lambda: ops.rms_norm(x, w, out=out, out_scale=out_scale), nbytes(x, w, out)),
            "add_rms_norm": (lambda: ops.add_rms_norm(x, res, w, out=out, out_scale=out_scale),
                             nbytes(x, res, res, w, out)),
            "ada_rms_norm": (lambda: ops.ada_rms_norm(x, scale, shift, out=out, out_scale=out_scale),
                             nbytes(x, scale, shift, out)),
            "gated_add_ada_rms_norm": (
                lambda: ops.gated_add_ada_rms_norm(x, res, gate, scale, shift, out=out, out_scale=out_scale),
                nbytes(x, res, res, gate, scale, shift, out)),
            "layer_norm": (lambda: ops.layer_norm(x, w, shift, out=out, out_scale=out_scale), nbytes(x, w, shift, out)),
            "add_layer_norm": (lambda: ops.add_layer_norm(x, res, w, shift, out=out, out_scale=out_scale),
                               nbytes(x, res, res, w, shift, out)),
        }
        return calls[kind]
    return make


def gelu_case(rows, features, fp8=False):
    def make():
        gu = rnd(rows, 2 * features, scale=2.0)
        out = torch.empty(rows, features, dtype=FP8 if fp8 else BF16, device=DEV)
        out_scale = torch.tensor([0.01], device=DEV) if fp8 else None
        return lambda: ops.gelu_tanh_mul(gu, out=out, out_scale=out_scale), nbytes(gu, out)
    return make


def gelu_plain_case(rows, features):
    def make():
        x = rnd(rows, features, scale=2.0)
        out = torch.empty_like(x)
        return lambda: ops.gelu_tanh(x, out=out), nbytes(x, out)
    return make


def rope_case(tokens, hq=8, hkv=1, dh=256, offset=560):
    def make():
        cos, sin = rope_tables(2048, dh)
        qkv = rnd(tokens, (hq + 2 * hkv) * dh)
        k_cache, v_cache = rnd(offset + tokens, hkv, dh), rnd(offset + tokens, hkv, dh)
        q = torch.empty(tokens, hq, dh, dtype=BF16, device=DEV)
        positions = torch.arange(offset, offset + tokens, dtype=torch.int32, device=DEV)
        moved = nbytes(qkv, q) + 2 * tokens * hkv * dh * 2 + 2 * tokens * dh * 2  # + cache rows, table rows
        return (lambda: ops.qkv_rope_split(qkv, cos, sin, positions, k_cache, v_cache, cache_offset=offset,
                                           q_scale=dh**-0.5, out=q), moved)
    return make


def quant_case(rows, dim):
    def make():
        x = rnd(rows, dim, scale=10.0)
        out = torch.empty(rows, dim, dtype=FP8, device=DEV)
        scale = torch.tensor([0.05], device=DEV)
        return lambda: ops.quantize_fp8(x, scale, out=out), nbytes(x, out)
    return make


def absmax_case(rows, dim):
    def make():
        x = rnd(rows, dim, scale=10.0)
        out = torch.zeros(1, device=DEV)
        return lambda: ops.absmax(x, out=out), nbytes(x)
    return make


def patches_case(views):
    def make():
        images = torch.randint(0, 256, (views, 224, 224, 3), dtype=torch.uint8, device=DEV)
        out = torch.empty(views * 256, 588, dtype=BF16, device=DEV)
        return lambda: ops.images_to_patches(images, 14, out=out), nbytes(images, out)
    return make


def euler_case(horizon, action_dim=32):
    def make():
        x, v = rnd(horizon, action_dim, dtype=torch.float32), rnd(horizon, action_dim)
        return lambda: ops.euler_step(x, v, -0.1), nbytes(x, x, v)
    return make


def attention_case(tokens, keys, hq=8, hkv=1, dh=256):
    def make():
        q, k, v = rnd(tokens, hq, dh), rnd(keys, hkv, dh), rnd(keys, hkv, dh)
        bias = torch.zeros(keys, device=DEV)
        out = torch.empty_like(q)
        ws = ops.decode_attention_workspace(q.shape, k.shape, DEV)
        return (lambda: ops.decode_attention(q, k, v, bias=bias, scale=dh**-0.5, out=out, workspace=ws),
                nbytes(q, k, v, bias, out))
    return make


def fused_attention_case(tokens, prefix, hq=8, hkv=1, dh=256):
    def make():
        cos, sin = rope_tables(2048, dh)
        qkv = rnd(tokens, (hq + 2 * hkv) * dh)
        k_cache, v_cache = rnd(prefix + tokens, hkv, dh), rnd(prefix + tokens, hkv, dh)
        positions = torch.arange(prefix, prefix + tokens, dtype=torch.int32, device=DEV)
        bias = torch.zeros(prefix + tokens, device=DEV)
        out = torch.empty(tokens, hq, dh, dtype=BF16, device=DEV)
        ws = ops.decode_attention_workspace(out.shape, k_cache.shape, DEV)
        return (lambda: ops.qkv_rope_attention(qkv, cos, sin, positions, k_cache, v_cache, prefix, bias=bias,
                                               out=out, workspace=ws),
                nbytes(qkv, k_cache, v_cache, bias, out))
    return make


CASES = {
    # Pi0.5 action expert (10 tokens, D 1024, FFN 4096), per layer per step
    "expert gated_add_ada_rms_norm 10x1024": norm_case(10, 1024, "gated_add_ada_rms_norm"),
    "expert gated_add_ada_rms_norm 10x1024 fp8": norm_case(10, 1024, "gated_add_ada_rms_norm", fp8=True),
    "expert qkv_rope_split 10 tok": rope_case(10),
    "expert decode_attention 10x8 vs 570": attention_case(10, 570),
    "expert qkv_rope_attention 10x8 vs 560+10": fused_attention_case(10, 560),
    "expert gelu_tanh_mul 10x4096": gelu_case(10, 4096),
    "expert euler_step 10x32": euler_case(10),
    # horizon 50
    "expert decode_attention 50x8 vs 610": attention_case(50, 610),
    # prefix (Gemma 2B, 2 views + 48 tokens = 560 rows)
    "prefix add_rms_norm 560x2048": norm_case(560, 2048, "add_rms_norm"),
    "prefix add_rms_norm 560x2048 fp8": norm_case(560, 2048, "add_rms_norm", fp8=True),
    "prefix qkv_rope_split 560 tok": rope_case(560, offset=0),
    "prefix gelu_tanh_mul 560x16384": gelu_case(560, 16384),
    "prefix gelu_tanh_mul 560x16384 fp8": gelu_case(560, 16384, fp8=True),
    # SigLIP (2 views: 512 rows, D 1152, FFN 4304)
    "siglip images_to_patches 2 views": patches_case(2),
    "siglip add_layer_norm 512x1152": norm_case(512, 1152, "add_layer_norm"),
    "siglip gelu_tanh 512x4304": gelu_plain_case(512, 4304),
    # calibration / FP8
    "quantize_fp8 1024x4304": quant_case(1024, 4304),
    "absmax 1024x4304": absmax_case(1024, 4304),
    # large rows, bandwidth-bound
    "rms_norm 8192x2048": norm_case(8192, 2048, "rms_norm"),
}


def time_case(make, replays: int) -> tuple[float, int]:
    """Median microseconds per call, and bytes moved per call."""
    first = make()
    per_call_bytes = first[1]
    sets = [first] + [make() for _ in range(min(MAX_SETS, max(1, L2_FLUSH_BYTES // per_call_bytes)) - 1)]
    for call, _ in sets:  # warm up outside capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call, _ in sets:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(sets))
    return statistics.median(times), per_call_bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-gbs", type=float, default=3000.0, help="copy bandwidth to compare with (GB/s)")
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    require_cuda_and_kernels("kernels_bench")
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  archs {kernels.compiled_archs()}")
    header = f"{'case':44s} {'kernel us':>9s} {'GB/s':>7s} {'%peak':>6s} {'twin us':>9s} {'speedup':>7s}"
    print(header)
    for name, make in CASES.items():
        if args.only not in name:
            continue
        t_kernel, moved = time_case(make, args.replays)
        with ops.use_reference():
            t_twin, _ = time_case(make, args.replays)
        gbs = moved / (t_kernel * 1e-6) / 1e9
        print(f"{name:44s} {t_kernel:9.2f} {gbs:7.0f} {100 * gbs / args.peak_gbs:6.1f} {t_twin:9.2f} "
              f"{t_twin / t_kernel:6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
