"""Benchmark of Policy.predict (the whole call: checks, resize, tokenization, model, un-normalization).

    python -m flashrt_core.bench --model pi05 --size tiny --views 2 --iters 200
    python -m flashrt_core.bench --checkpoint /path/to/pi05 --device cuda --iters 100

Without --checkpoint a synthetic checkpoint of --size is written to a temporary directory
(full size: about 6.7 GB, bf16). Prints p50 / p90 / mean wall time of predict, the rate it
sustains, and the split of the p50 call; --json prints the numbers as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .policy import load_policy
from .synthetic import write_checkpoint

PROMPT = "pick up the red block and put it in the bowl"


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_predict(policy, iters: int, warmup: int, prompt: str = PROMPT, seed: int = 0) -> dict:
    """Time `iters` predict calls on fixed random camera images and a slowly moving state."""
    rng = np.random.default_rng(seed)
    height, width = policy.spec.image_size
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(policy.spec.num_views)]
    state = rng.normal(size=policy.spec.state_dim)
    for i in range(warmup):
        policy.predict(images, state + 0.01 * i, prompt)
    walls, parts = [], []
    started = time.perf_counter()
    for i in range(iters):
        t0 = time.perf_counter()
        result = policy.predict(images, state + 0.01 * i, prompt)
        walls.append(time.perf_counter() - t0)
        parts.append(result.timing)
    elapsed = time.perf_counter() - started
    p50 = percentile(walls, 50)
    median_call = min(range(iters), key=lambda i: abs(walls[i] - p50))
    return {"iters": iters, "p50_ms": 1e3 * p50, "p90_ms": 1e3 * percentile(walls, 90),
            "mean_ms": 1e3 * statistics.fmean(walls), "hz": iters / elapsed,
            "p50_split_ms": {k: 1e3 * v for k, v in parts[median_call].items()}}


def environment(policy) -> dict:
    device = policy.spec.device
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.processor()
    return {"device": device, "device_name": name or platform.machine(), "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "spec": policy.spec.__dict__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flashrt_core.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint directory (default: a synthetic one)")
    parser.add_argument("--model", choices=["pi0", "pi05"], default="pi05")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny", help="synthetic checkpoint size")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--num-steps", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the policy's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")

    with tempfile.TemporaryDirectory(prefix="flashrt-bench-") as scratch:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = write_checkpoint(args.model, Path(scratch) / f"{args.model}_{args.size}", args.size)
        policy = load_policy(checkpoint, model=args.model if args.checkpoint is None else None, device=args.device,
                             precision=args.precision, num_views=args.views, num_steps=args.num_steps,
                             backend=args.backend)
        if args.threads:
            torch.set_num_threads(args.threads)  # after loading: the policy picks a count for tiny models
        try:
            numbers = bench_predict(policy, args.iters, args.warmup)
            report = {**environment(policy), "checkpoint": str(args.checkpoint or f"synthetic {args.size}"),
                      "command": " ".join(["python -m flashrt_core.bench", *(argv if argv is not None else sys.argv[1:])]),
                      **numbers}
        finally:
            policy.close()

    if args.json:
        print(json.dumps(report))
        return 0
    spec = policy.spec
    print(f"{spec.model} ({report['checkpoint']}), {spec.num_views} views, horizon {spec.action_horizon}, "
          f"{spec.num_steps} steps, {spec.backend} backend, {spec.precision}")
    print(f"{report['device_name']} ({report['device']}, {report['cpu_threads']} CPU threads), torch {report['torch']}")
    print(f"predict: p50 {report['p50_ms']:.2f} ms  p90 {report['p90_ms']:.2f} ms  mean {report['mean_ms']:.2f} ms  "
          f"-> {report['hz']:.1f} Hz over {report['iters']} calls")
    print("p50 call: " + "  ".join(f"{k} {v:.2f} ms" for k, v in report["p50_split_ms"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
