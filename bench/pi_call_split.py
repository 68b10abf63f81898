"""Where a `PiGraphRuntime.sample_actions` call spends its wall time beyond the graph
replay: host staging, graph launch, waiting for the GPU, copy back. Full-size random weights.

    python bench/pi_call_split.py --model pi05 --views 2 --precision bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import require_cuda_and_kernels  # noqa: E402
from flashrt_core import synthetic  # noqa: E402
from flashrt_core.models.pi0 import PiConfig  # noqa: E402
from flashrt_core.runtime.pi0_graph import PiGraphRuntime  # noqa: E402


@torch.inference_mode()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pi05", choices=["pi05", "pi0"])
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp8"])
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args(argv)
    require_cuda_and_kernels("pi_call_split")
    device = torch.device("cuda")
    config = replace(PiConfig(variant=args.model), action_horizon=args.horizon)
    weights = synthetic.random_state_dict(config, seed=0, device=device, dtype=torch.bfloat16)
    fast = PiGraphRuntime.from_state_dict(config, weights, device=device, precision=args.precision)
    obs = synthetic.random_observation(config, args.views, args.prompt_tokens, seed=args.views)
    if args.precision == "fp8":
        fast.calibrate([obs])
    fast.prepare(args.views, [fast._bucket(args.prompt_tokens)], fewer_views=False)
    for _ in range(5):
        fast.sample_actions(*obs)

    parts = {name: [] for name in ("stage", "launch", "gpu wait", "copy back", "sum", "replay (events)", "call")}
    for _ in range(args.iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        session, bucket = fast._stage(*obs)
        t1 = time.perf_counter()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fast._capture(session, bucket).replay()
        end.record()
        t2 = time.perf_counter()
        end.synchronize()
        t3 = time.perf_counter()
        fast._host_out.copy_(session.x_t, non_blocking=True)
        fast._done.record()
        fast._done.synchronize()
        t4 = time.perf_counter()
        for name, value in (("stage", t1 - t0), ("launch", t2 - t1), ("gpu wait", t3 - t2), ("copy back", t4 - t3),
                            ("sum", t4 - t0)):
            parts[name].append(1e3 * value)
        parts["replay (events)"].append(start.elapsed_time(end))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fast.sample_actions(*obs)
        parts["call"].append(1e3 * (time.perf_counter() - t0))
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.model} {args.views} views "
          f"H={args.horizon} {args.precision}")
    for name, values in parts.items():
        print(f"  {name:16s} p50 {statistics.median(values):7.3f} ms   max {max(values):7.3f} ms")


if __name__ == "__main__":
    main()
