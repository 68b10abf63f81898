"""Pi0 / Pi0.5 on the GPU: graph runtime vs the eager reference, full-size random weights.

For each model x action horizon x views x precision it prints graph-replay p50/p90, the
backend call p50 (host staging + replay + copy back + sync), the roofline fraction, peak
GPU memory, the eager PyTorch reference (PiModel, bf16) in the same run and the speedup,
and the cosine of the fast path's actions to the fp32 reference on the same noise.

    python bench/pi_runtime.py --models pi05 pi0 --views 1 2 3 --horizons 10 50 --json out.json

Floors (DESIGN.md §5, measured H100 ceilings): the prefix is compute-bound
(FLOPs / 790 TFLOP/s bf16, 1480 fp8) and every flow step must read the expert weights once
(bytes / 3.0 TB/s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import require_cuda_and_kernels  # noqa: E402
from flashrt_core import synthetic  # noqa: E402
from flashrt_core.models.pi0 import PiConfig, PiModel  # noqa: E402
from flashrt_core.runtime.graphs import CapturedForward  # noqa: E402
from flashrt_core.runtime.pi0_graph import PiGraphRuntime  # noqa: E402

MATMUL_FLOPS = {"bf16": 790e12, "fp8": 1480e12}
COPY_BYTES_PER_S = 3.0e12
WEIGHT_BYTES = {"bf16": 2, "fp8": 1}


def prefix_flops(config: PiConfig, views: int, prompt_tokens: int) -> float:
    """Matmul FLOPs of SigLIP + projector + Gemma prefix (2 per multiply-add)."""
    vc, gc = config.vision, config.vlm
    n_img = views * vc.num_patches
    vision = 2 * n_img * (3 * vc.patch_size**2 * vc.width
                          + vc.depth * (4 * vc.width**2 + 2 * vc.width * vc.mlp_dim)
                          + 2 * vc.num_patches * vc.width * vc.depth)  # attention scores + values
    vision += 2 * n_img * vc.width * gc.width
    n = n_img + prompt_tokens
    qkv = (gc.num_heads + 2 * gc.num_kv_heads) * gc.head_dim
    per_layer = 2 * n * (gc.width * qkv + gc.num_heads * gc.head_dim * gc.width + 3 * gc.width * gc.mlp_dim)
    per_layer += 4 * n * n * gc.num_heads * gc.head_dim
    return vision + gc.depth * per_layer


def expert_weight_bytes(config: PiConfig, precision: str) -> float:
    ec = config.expert
    qkv = (ec.num_heads + 2 * ec.num_kv_heads) * ec.head_dim
    per_layer = ec.width * qkv + ec.num_heads * ec.head_dim * ec.width + 3 * ec.width * ec.mlp_dim
    return ec.depth * per_layer * WEIGHT_BYTES[precision]


def floor_ms(config: PiConfig, views: int, prompt_tokens: int, precision: str) -> float:
    compute = prefix_flops(config, views, prompt_tokens) / MATMUL_FLOPS[precision]
    weights = config.num_steps * expert_weight_bytes(config, precision) / COPY_BYTES_PER_S
    return 1e3 * (compute + weights)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def time_replays(graph, iters: int) -> list[float]:
    """Per-replay ms from CUDA events around each replay."""
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_calls(fn, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


@torch.inference_mode()
def breakdown(fast: PiGraphRuntime, views: int, prompt_tokens: int, iters: int) -> dict[str, float]:
    """ms of the parts of the forward, each captured as its own graph over the same buffers:
    SigLIP, Gemma prefix, one flow step (the steps are identical in work)."""
    s = fast._session(views)
    prefix_len = s.image_tokens + fast._bucket(prompt_tokens)
    first = 0 if fast.config.pi05 else 1
    parts = {"vision": lambda: fast._vision(s), "prefix": lambda: fast._prefix(s, prefix_len),
             "flow_step": lambda: fast._flow_step(s, prefix_len, first, 0)}
    out = {}
    for name, fn in parts.items():
        graph = CapturedForward(fn, fast.device)
        out[name] = statistics.median(time_replays(graph, iters))
    return out


def run(args) -> list[dict]:
    device = torch.device("cuda")
    rows = []
    for model in args.models:
        for horizon in args.horizons:
            config = replace(PiConfig(variant=model), action_horizon=horizon, num_steps=args.steps)
            print(f"== {model} horizon {horizon}: random full-size weights", flush=True)
            # Made on the GPU (fast), kept on the host like a loaded checkpoint, so each
            # backend's GPU memory is its own.
            weights = {k: v.cpu() for k, v in synthetic.random_state_dict(
                config, seed=0, device=device, dtype=torch.bfloat16).items()}
            torch.cuda.empty_cache()
            for precision in args.precisions:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fast = PiGraphRuntime.from_state_dict(config, weights, device=device, precision=precision,
                                                      expert_path=args.expert_path)
                if precision == "fp8":
                    fast.calibrate([synthetic.random_observation(config, max(args.views), args.prompt_tokens,
                                                                 seed=1000 + i) for i in range(4)])
                for views in args.views:
                    obs = synthetic.random_observation(config, views, args.prompt_tokens, seed=views)
                    fast.prepare(views, [fast._bucket(args.prompt_tokens)], fewer_views=False)
                    actions = fast.sample_actions(*obs)
                    graph = fast._session(views).graphs[fast._bucket(args.prompt_tokens)]
                    replay = time_replays(graph, args.iters)
                    call = time_calls(lambda: fast.sample_actions(*obs), args.iters)
                    row = dict(model=model, horizon=horizon, views=views, precision=precision,
                               expert_path="small_m" if fast.w.fused_expert else "gemm",
                               prompt_tokens=args.prompt_tokens, steps=config.num_steps,
                               replay_p50=statistics.median(replay), replay_p90=percentile(replay, 90),
                               call_p50=statistics.median(call), call_p90=percentile(call, 90),
                               floor_ms=floor_ms(config, views, args.prompt_tokens, precision),
                               peak_gb=(torch.cuda.max_memory_allocated() - base) / 1e9, actions=actions)
                    if args.breakdown:
                        row["breakdown_ms"] = breakdown(fast, views, args.prompt_tokens, args.iters // 4 + 1)
                    rows.append(row)
                del fast
                torch.cuda.empty_cache()
            # The eager reference in bf16 (the peer's path) and the fp32 oracle, same inputs.
            for dtype, key in ((torch.bfloat16, "eager"), (torch.float32, "fp32")):
                model_ref = PiModel.from_state_dict(config, weights, device=device, dtype=dtype)
                for row in rows:
                    if row["model"] != model or row["horizon"] != horizon or "cos_vs_fp32" in row:
                        continue
                    obs = synthetic.random_observation(config, row["views"], args.prompt_tokens, seed=row["views"])
                    if key == "eager":
                        row["eager_p50"] = statistics.median(time_calls(lambda: model_ref.sample_actions(*obs),
                                                                        args.eager_iters))
                    else:
                        row["cos_vs_fp32"] = cosine(row.pop("actions"), model_ref.sample_actions(*obs).cpu())
                del model_ref
                torch.cuda.empty_cache()
            for row in rows:
                if row["model"] == model and row["horizon"] == horizon and "roofline" not in row:
                    row["roofline"] = row["floor_ms"] / row["replay_p50"]
                    row["speedup_vs_eager"] = row["eager_p50"] / row["replay_p50"]
                    print("  views {views} {precision} ({expert_path} expert): replay p50 {replay_p50:.2f} p90 {replay_p90:.2f} ms | call p50 "
                          "{call_p50:.2f} ms | floor {floor_ms:.2f} ms ({roofline:.0%}) | eager {eager_p50:.1f} ms "
                          "(x{speedup_vs_eager:.1f}) | peak {peak_gb:.1f} GB | cos {cos_vs_fp32:.5f}".format(**row),
                          flush=True)
                    if "breakdown_ms" in row:
                        print("    " + ", ".join(f"{k} {v:.2f} ms" for k, v in row["breakdown_ms"].items()))
            del weights
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["pi05", "pi0"])
    parser.add_argument("--views", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--horizons", nargs="+", type=int, default=[10, 50])
    parser.add_argument("--precisions", nargs="+", default=["bf16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--eager-iters", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true", help="also time vision / prefix / one flow step")
    parser.add_argument("--expert-path", default="auto", choices=["auto", "small_m", "gemm"],
                        help="the runtime's expert path (default: its own choice by horizon)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    require_cuda_and_kernels("pi_runtime")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}", flush=True)
    rows = run(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
