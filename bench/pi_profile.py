"""Per-kernel CUDA time of one part of the Pi forward (vision / prefix / flow_step / all),
captured as a graph and replayed under torch.profiler: where the microseconds go.

    python bench/pi_profile.py --model pi05 --part flow_step --views 2
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import require_cuda_and_kernels  # noqa: E402
from flashrt_core import synthetic  # noqa: E402
from flashrt_core.models.pi0 import PiConfig  # noqa: E402
from flashrt_core.runtime.graphs import CapturedForward  # noqa: E402
from flashrt_core.runtime.pi0_graph import PiGraphRuntime  # noqa: E402


@torch.inference_mode()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pi05")
    parser.add_argument("--part", default="flow_step", choices=["vision", "prefix", "flow_step", "all"])
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--expert-path", default="auto", choices=["auto", "small_m", "gemm"],
                        help="the runtime's expert path (auto: small-M kernels up to 16 rows, cuBLAS above)")
    args = parser.parse_args(argv)
    require_cuda_and_kernels("pi_profile")
    config = replace(PiConfig(variant=args.model), action_horizon=args.horizon)
    weights = synthetic.random_state_dict(config, seed=0, device="cuda", dtype=torch.bfloat16)
    fast = PiGraphRuntime.from_state_dict(config, weights, device="cuda", precision=args.precision,
                                          expert_path=args.expert_path)
    obs = synthetic.random_observation(config, args.views, args.prompt_tokens, seed=0)
    if args.precision == "fp8":
        fast.calibrate([obs])
    fast.sample_actions(*obs)  # stages inputs, captures the bucket
    s = fast._session(args.views)
    prefix_len = s.image_tokens + fast._bucket(args.prompt_tokens)
    first = 0 if config.pi05 else 1
    part = {"vision": lambda: fast._vision(s), "prefix": lambda: fast._prefix(s, prefix_len),
            "flow_step": lambda: fast._flow_step(s, prefix_len, first, 0),
            "all": lambda: fast._forward(s, fast._bucket(args.prompt_tokens))}[args.part]
    graph = CapturedForward(part, fast.device)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.replays):
            graph.replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in events) / args.replays
    print(f"{args.part}: {len(events) / args.replays:.0f} kernels per replay, {total_us:.1f} us of kernel time")


if __name__ == "__main__":
    main()
