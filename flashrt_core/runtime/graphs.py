"""CUDA-graph capture over static buffers.

A captured forward replays with no Python, no allocation and no host sync: every
buffer it touches was allocated before capture and every op writes into one of them
(`out=`). Graphs of one runtime share a memory pool, so the scratch that cuBLAS /
SDPA allocate during capture is reused across graphs instead of multiplied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CapturedForward:
    """`fn` captured once on its own stream, replayed on the current stream."""

    def __init__(self, fn: Callable[[], None], device: torch.device, pool=None, warmup: int = 2):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        # Warm-up outside capture: cuBLAS handles, SDPA backend choice and lazy module
        # loads must happen before capture, where they would be illegal.
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            fn()
        self.pool = self.graph.pool()

    def replay(self) -> None:
        self.graph.replay()
