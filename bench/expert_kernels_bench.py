"""Benchmark of the action-expert kernels (flashrt_core.ops.expert) on a CUDA GPU.

Every number is CUDA-graph replay: a graph holds one launch per layer for `--layers`
distinct weight sets (18 = the Pi0.5 expert, 622 MB bf16: no L2 reuse), and the time
per launch is the median replay time over the layers. The `chain` section chains whole
layers (the five calls each) on one residual, the real dependency. Baselines run in the
same process on the same inputs: torch.nn.functional.linear (cuBLAS, bf16),
torch._scaled_mm (FP8, M padded to 16, activation pre-quantized: the GEMM alone), SDPA
(flash without a mask, and with the key-padding mask). Effective bandwidth = weight
bytes / time; the copy rate of the card (read + write of 1 GiB) is measured first for
the ratio.

    python bench/expert_kernels_bench.py [--m 10 50] [--layers 18] [--out table.md]
        [--sections attention chain gemm fused]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bench_common import require_cuda_and_kernels
from flashrt_core import kernels, ops
from flashrt_core.ops import expert
from flashrt_core.ops.expert import AdaRmsNorm, AttentionLaunch, LinearLaunch

BF16 = torch.bfloat16
HIDDEN, MLP, HEADS, HEAD_DIM = 1024, 4096, 8, 256
SHAPES = {"qkv": (HIDDEN, 2560), "o_proj": (2 * HIDDEN, HIDDEN), "gate_up": (HIDDEN, 2 * MLP),
          "down": (MLP, HIDDEN)}


@dataclass
class Table:
    rows: list = field(default_factory=list)

    def add(self, *cells):
        self.rows.append([str(c) for c in cells])
        print(" | ".join(self.rows[-1]), flush=True)

    def markdown(self, header):
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in self.rows])


def graph_time_us(step, launches: int, replays: int = 20, trials: int = 15) -> float:
    """Median time of one launch: `step()` captured once (holding `launches` launches)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside capture (module load, attributes, cuBLAS handles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        step()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / replays / launches)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    n = 1 << 29  # 1 GiB of bf16
    src, dst = torch.randn(n, device="cuda", dtype=BF16), torch.empty(n, device="cuda", dtype=BF16)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * n * 2 * 10 / (start.elapsed_time(end) / 1000.0) / 1e9


def rnd(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def weights(n, k, layers, fp8):
    out = []
    for _ in range(layers):
        w = rnd(n, k, dtype=torch.float32, scale=k**-0.5)
        out.append(expert.quantize_weight_fp8(w) if fp8 else (w.to(BF16), None))
    return out


def bench_gemms(table: Table, ms, layers, copy_gbs, sweep):
    for name, (k, n) in SHAPES.items():
        for fp8 in (False, True):
            ws = weights(n, k, layers, fp8)
            wbytes = n * k * (1 if fp8 else 2) + (4 * n if fp8 else 0)
            for m in ms:
                x = rnd(m, k)
                outs = [torch.empty(m, n, dtype=BF16, device="cuda") for _ in range(layers)]

                def ours(launch):
                    return lambda: [expert.linear(x, w, w_scale=s, out=o, launch=launch)
                                    for (w, s), o in zip(ws, outs)]

                variants = {"auto": LinearLaunch(), "auto+pdl": LinearLaunch(pdl=True)}
                if sweep:
                    chunk = 64 if fp8 else 32
                    for split in (1, 2, 4, 8):
                        if k % (split * 8 * chunk) == 0:
                            variants[f"split{split}+pdl"] = LinearLaunch(split_k=split, pdl=True)
                for label, launch in variants.items():
                    try:
                        us = graph_time_us(ours(launch), layers)
                    except ValueError as exc:  # a launch shape this size does not take
                        print(f"skip {name} M={m} {label}: {exc}", file=sys.stderr)
                        continue
                    gbs = wbytes / us / 1e3
                    table.add(name, m, "fp8" if fp8 else "bf16", f"ours {label}", f"{us:.2f}", f"{gbs:.0f}",
                              f"{gbs / copy_gbs:.0%}")
                if fp8:
                    mp = max(16, (m + 15) // 16 * 16)
                    x8 = rnd(mp, k).to(torch.float8_e4m3fn)
                    one = torch.ones((), device="cuda")

                    def baseline():
                        for (w, s), o in zip(ws, outs):
                            torch._scaled_mm(x8, w.t(), scale_a=one, scale_b=one, out_dtype=BF16)
                    label = f"torch._scaled_mm M={mp}"
                else:
                    def baseline():
                        for (w, _), o in zip(ws, outs):
                            torch.mm(x, w.t(), out=o)
                    label = "torch.mm (cuBLAS)"
                us = graph_time_us(baseline, layers)
                gbs = wbytes / us / 1e3
                table.add(name, m, "fp8" if fp8 else "bf16", label, f"{us:.2f}", f"{gbs:.0f}", f"{gbs / copy_gbs:.0%}")
            del ws


def bench_fused(table: Table, ms, layers, copy_gbs):
    """The fused variants a layer runs, to show the prologue / epilogue cost."""
    cos = torch.randn(1024, HEAD_DIM // 2, device="cuda")
    sin = torch.randn(1024, HEAD_DIM // 2, device="cuda")
    for fp8, act in ((False, BF16), (False, torch.float32), (True, BF16)):
        for m in ms:
            x = rnd(m, HIDDEN, dtype=act)  # the residual stream (norm input, gated-residual target)
            norm = AdaRmsNorm(rnd(HIDDEN, dtype=torch.float32, scale=0.1), rnd(HIDDEN, dtype=torch.float32))
            gate = rnd(HIDDEN, dtype=torch.float32)
            positions = torch.arange(m, device="cuda", dtype=torch.int32)
            offset = torch.zeros(1, device="cuda", dtype=torch.int32)
            kc = torch.zeros(1100, 1, HEAD_DIM, dtype=BF16, device="cuda")
            vc = torch.zeros_like(kc)
            q = torch.empty(m, HEADS, HEAD_DIM, dtype=BF16, device="cuda")
            h = rnd(m, MLP)
            a = rnd(m, 2 * HIDDEN)
            res = rnd(m, HIDDEN, dtype=act)
            launch = LinearLaunch(pdl=True)
            cases = {
                "qkv+adaRMS+rope": ("qkv", lambda w, s: expert.linear_qkv_rope(
                    x, w, w_scale=s, norm=norm, cos=cos, sin=sin, positions=positions, k_cache=kc, v_cache=vc,
                    cache_offset=offset, q_out=q, q_scale=0.0625, launch=launch)),
                "o_proj+gated residual": ("o_proj", lambda w, s: expert.linear_gated_residual(
                    a, w, res, gate=gate, w_scale=s, launch=launch)),
                "gate_up+adaRMS+gelu": ("gate_up", lambda w, s: expert.linear_gelu_mul(
                    x, w, w_scale=s, norm=norm, out=h, launch=launch)),
                "down+gated residual": ("down", lambda w, s: expert.linear_gated_residual(
                    h, w, res, gate=gate, w_scale=s, launch=launch)),
            }
            for label, (shape, call) in cases.items():
                k, n = SHAPES[shape]
                ws = weights(n, k, layers, fp8)
                wbytes = n * k * (1 if fp8 else 2) + (4 * n if fp8 else 0)
                try:
                    us = graph_time_us(lambda: [call(w, s) for w, s in ws], layers)
                except ValueError as exc:
                    print(f"skip {label} M={m}: {exc}", file=sys.stderr)
                    continue
                gbs = wbytes / us / 1e3
                table.add(shape, m, "fp8" if fp8 else "bf16", f"ours {label} +pdl, {str(act)[6:]} residual",
                          f"{us:.2f}", f"{gbs:.0f}", f"{gbs / copy_gbs:.0%}")


def bench_attention(table: Table, layers, sweep):
    for m, s in ((10, 570), (10, 1100), (50, 570), (50, 1100)):
        qs = [rnd(m, HEADS, HEAD_DIM) for _ in range(layers)]
        kvs = [(rnd(s, 1, HEAD_DIM), rnd(s, 1, HEAD_DIM)) for _ in range(layers)]
        bias = torch.zeros(s, device="cuda")
        bias[s - s // 8:] = float("-inf")
        outs = [torch.empty_like(q) for q in qs]
        variants = {"auto": AttentionLaunch(), "auto+pdl": AttentionLaunch(pdl=True)}
        if sweep:
            for splits in (1, 4, 8, 16):
                for rows in (16, 32):
                    variants[f"splits{splits} rows{rows}+pdl"] = AttentionLaunch(splits=splits, rows_per_block=rows,
                                                                                pdl=True)
        for label, launch in variants.items():
            try:
                us = graph_time_us(lambda: [expert.decode_attention(q, k, v, bias=bias, out=o, launch=launch)
                                            for q, (k, v), o in zip(qs, kvs, outs)], layers)
            except ValueError as exc:
                print(f"skip {label}: {exc}", file=sys.stderr)
                continue
            table.add("attention", m, f"S={s}", f"ours {label}", f"{us:.2f}", "", "")
        try:  # the generic decode attention of flashrt_core.ops (CUDA cores, workspace merge)
            workspace = ops.decode_attention_workspace(qs[0].shape, kvs[0][0].shape, "cuda")
            us = graph_time_us(lambda: [ops.decode_attention(q, k, v, bias, out=o, workspace=workspace)
                                        for q, (k, v), o in zip(qs, kvs, outs)], layers)
            table.add("attention", m, f"S={s}", "ops.decode_attention (generic)", f"{us:.2f}", "", "")
        except (AttributeError, RuntimeError, ValueError) as exc:
            print(f"skip ops.decode_attention: {exc}", file=sys.stderr)
        # SDPA on [1, H, M, D] against [1, H, S, D] (the KV head expanded, as a caller would)
        q4 = [q.transpose(0, 1)[None] for q in qs]
        kv4 = [(k.transpose(0, 1)[None].expand(1, HEADS, s, HEAD_DIM), v.transpose(0, 1)[None].expand(
            1, HEADS, s, HEAD_DIM)) for k, v in kvs]
        mask = bias.view(1, 1, 1, s).expand(1, HEADS, m, s).to(BF16)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for label, backend, attn_mask in (("SDPA flash (no mask)", SDPBackend.FLASH_ATTENTION, None),
                                          ("SDPA efficient (mask)", SDPBackend.EFFICIENT_ATTENTION, mask),
                                          ("SDPA cuDNN (mask)", SDPBackend.CUDNN_ATTENTION, mask)):
            def run():
                with sdpa_kernel(backend):
                    for q, (k, v) in zip(q4, kv4):
                        F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            try:
                us = graph_time_us(run, layers)
            except RuntimeError as exc:
                print(f"skip {label}: {str(exc).splitlines()[0]}", file=sys.stderr)
                continue
            table.add("attention", m, f"S={s}", label, f"{us:.2f}", "", "")


def bench_layer_chain(table: Table, layers, copy_gbs):
    """Whole expert steps: 5 fused calls per layer x `layers`, one graph; and the
    unfused GEMMs + SDPA of cuBLAS / flash for the same step (no norms, rope or
    elementwise: a lower bound for the unfused path)."""
    m, prefix = 10, 560
    s = prefix + m
    cos = torch.randn(1024, HEAD_DIM // 2, device="cuda")
    sin = torch.randn(1024, HEAD_DIM // 2, device="cuda")
    positions = torch.arange(prefix, s, device="cuda", dtype=torch.int32)
    offset = torch.tensor([prefix], device="cuda", dtype=torch.int32)
    bias = torch.zeros(s, device="cuda")
    bias[prefix - 40:prefix] = float("-inf")
    q = torch.empty(m, HEADS, HEAD_DIM, dtype=BF16, device="cuda")
    attn = torch.empty_like(q)
    h = torch.empty(m, MLP, dtype=BF16, device="cuda")
    for fp8, act in ((False, BF16), (False, torch.float32), (True, BF16)):
        x = rnd(m, HIDDEN, dtype=act)
        lay = []
        for _ in range(layers):
            w = {name: weights(n, k, 1, fp8)[0] for name, (k, n) in SHAPES.items()}
            mod = [rnd(HIDDEN, dtype=torch.float32, scale=0.1) for _ in range(6)]
            kc, vc = rnd(s, 1, HEAD_DIM), rnd(s, 1, HEAD_DIM)
            lay.append((w, mod, kc, vc))
        wbytes = sum(n * k for k, n in SHAPES.values()) * (1 if fp8 else 2) * layers
        for pdl in (False, True):
            lin, att = LinearLaunch(pdl=pdl), AttentionLaunch(pdl=pdl)

            def step():
                for w, (s1, sh1, g1, s2, sh2, g2), kc, vc in lay:
                    expert.linear_qkv_rope(x, w["qkv"][0], w_scale=w["qkv"][1], norm=AdaRmsNorm(s1, sh1), cos=cos,
                                           sin=sin, positions=positions, k_cache=kc, v_cache=vc,
                                           cache_offset=offset, q_out=q, q_scale=0.0625, launch=lin)
                    expert.decode_attention(q, kc, vc, bias=bias, scale=1.0, out=attn, launch=att, stable_keys=prefix)
                    expert.linear_gated_residual(attn.view(m, -1), w["o_proj"][0], x, gate=g1, w_scale=w["o_proj"][1],
                                                 launch=lin)
                    expert.linear_gelu_mul(x, w["gate_up"][0], w_scale=w["gate_up"][1], norm=AdaRmsNorm(s2, sh2),
                                           out=h, launch=lin)
                    expert.linear_gated_residual(h, w["down"][0], x, gate=g2, w_scale=w["down"][1], launch=lin)
            us = graph_time_us(step, 1, replays=5, trials=9)
            floor = wbytes / (copy_gbs * 1e3)
            table.add("expert step", m, "fp8" if fp8 else "bf16",
                      f"ours 5 kernels/layer{' +pdl' if pdl else ''}, {str(act)[6:]} residual", f"{us:.1f}",
                      f"{wbytes / us / 1e3:.0f}", f"floor {floor:.0f} us")
        if not fp8 and act == BF16:
            xb = x.to(BF16)
            qkv = torch.empty(m, 2560, dtype=BF16, device="cuda")
            o = torch.empty(m, HIDDEN, dtype=BF16, device="cuda")
            gu = torch.empty(m, 2 * MLP, dtype=BF16, device="cuda")
            q4 = q.transpose(0, 1)[None]

            def unfused():
                from torch.nn.attention import SDPBackend, sdpa_kernel
                for w, _, kc, vc in lay:
                    torch.mm(xb, w["qkv"][0].t(), out=qkv)
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        a = F.scaled_dot_product_attention(q4, kc.transpose(0, 1)[None].expand(1, HEADS, s, HEAD_DIM),
                                                           vc.transpose(0, 1)[None].expand(1, HEADS, s, HEAD_DIM))
                    torch.mm(a[0].transpose(0, 1).reshape(m, -1), w["o_proj"][0].t(), out=o)
                    torch.mm(xb, w["gate_up"][0].t(), out=gu)
                    torch.mm(gu[:, :MLP], w["down"][0].t(), out=o)
            us = graph_time_us(unfused, 1, replays=5, trials=9)
            table.add("expert step", m, "bf16", "cuBLAS GEMMs + SDPA flash only (unfused lower bound)", f"{us:.1f}",
                      f"{wbytes / us / 1e3:.0f}", "")
        del lay


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=[10, 50], help="token counts (action horizon)")
    parser.add_argument("--layers", type=int, default=18, help="distinct weight sets per graph")
    parser.add_argument("--sweep", action="store_true", help="also time split / key-split variants")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--sections", nargs="+", choices=["attention", "chain", "gemm", "fused"],
                        default=["attention", "chain", "gemm", "fused"], help="which sections to run")
    args = parser.parse_args(argv)
    require_cuda_and_kernels("expert_kernels_bench")
    if not hasattr(kernels.module(), "small_m_linear"):
        sys.exit("expert_kernels_bench: the extension was built without the expert kernels")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    copy_gbs = copy_bandwidth_gbs()
    title = (f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, CUDA {torch.version.cuda}; "
             f"copy {copy_gbs:.0f} GB/s (read + write); CUDA-graph replay, {args.layers} rotating weight sets")
    print(title, flush=True)
    table = Table()
    sections = {"attention": lambda: bench_attention(table, args.layers, args.sweep),
                "chain": lambda: bench_layer_chain(table, args.layers, copy_gbs),
                "gemm": lambda: bench_gemms(table, args.m, args.layers, copy_gbs, args.sweep),
                "fused": lambda: bench_fused(table, args.m, args.layers, copy_gbs)}
    sections = [sections[name] for name in args.sections]
    for section in sections:  # one failing section must not cost the others' numbers
        try:
            section()
        except Exception as exc:  # noqa: BLE001 - reported, the table keeps what ran
            print(f"section failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    text = f"{title}\n\n" + table.markdown(["op", "M", "weights", "variant", "us", "GB/s", "of copy"]) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
