"""Fast Pi0 / Pi0.5 backend: the reference forward (models.pi0.PiModel, the oracle) rewritten
over static buffers and fused ops, captured as one CUDA graph per (views, prompt bucket).

It computes the same function as PiModel; what it does differently, and why that is safe:
- Weights are prepared once: fused QKV and gate|up GEMMs, the patch conv as one GEMM over
  patch rows (images_to_patches also does the uint8 -> [-1, 1] scaling inside the graph),
  the text embedding pre-multiplied by sqrt(width) (the reference multiplies the stored
  row by the same rounded factor, so the product is identical).
- Everything that depends only on the flow step is precomputed: the time embedding, every
  Pi0.5 adaRMS (scale, shift, gate), the time half of Pi0's action_time_mlp_in.
- Pi0's state token sees only the prefix and itself and has no time input, so its expert
  K/V are the same at every step: computed once per call, as row 0 of flow step 0 (a key
  bias per row keeps the actions out of its view), then read from the cache.
- The last layer of a pass whose output is never read (the prefix) stops after writing
  its K/V.
- Prompts are cut to the smallest bucket holding the valid tokens: padding is right of
  them and masked, so the result is unchanged and a new prompt length reuses a graph.
- Masked keys get a large finite negative logit (as the reference), never -inf, so a fully
  masked padding row stays finite and cannot leak NaN into valid rows through its K/V.

On a CPU (or with kernels unavailable) the same code runs eagerly through the ops' PyTorch
twins; CI checks it against PiModel there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from .. import ops
from ..errors import ImageError
from ..ops import expert as expert_ops
from ..ops.expert_reference import AdaRmsNorm, AttentionLaunch, LinearLaunch, RmsNorm
from ..models.gemma import MASKED_LOGIT, rope_tables
from ..models.pi0 import PiConfig, flow_times, time_embedding
from .graphs import CapturedForward
from .precision import Fp8Linear, Linear, addmm_gelu_is_tanh, fp8_capable, gemm_input

log = logging.getLogger(__name__)

VISION = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
PROJECTOR = "paligemma_with_expert.paligemma.model.multi_modal_projector.linear."
VLM = "paligemma_with_expert.paligemma.model.language_model."
EXPERT = "paligemma_with_expert.gemma_expert.model."

PROMPT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256)
# Above this many suffix rows cuBLAS beats the small-M kernels (measured on H100, M=50).
SMALL_M_MAX_ROWS = 16
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


def apply_norm(norm, res: torch.Tensor, out: torch.Tensor, added=None, gate=None) -> None:
    """out = norm(res) through the row-norm kernels, first adding `added` (times `gate`
    where there is one) into the residual in place."""
    if isinstance(norm, AdaRmsNorm):
        if added is None:
            ops.ada_rms_norm(res, norm.scale, norm.shift, out=out)
        else:
            ops.gated_add_ada_rms_norm(added, res, gate, norm.scale, norm.shift, out=out)
    elif added is None:
        ops.rms_norm(res, norm.weight, out=out)
    else:
        ops.add_rms_norm(added, res, norm.weight, out=out)


def _host(t: torch.Tensor) -> np.ndarray:
    """A host tensor's numpy view (a device tensor is copied)."""
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def present_views(images: torch.Tensor, image_mask: torch.Tensor):
    """Drop masked views. SigLIP encodes each view alone and a masked view's tokens are
    invisible and take no position, so the forward over the remaining views is the same
    function; it keeps every valid prefix key leading (see _prefix_attention)."""
    image_mask = image_mask.to(torch.bool)
    if bool(image_mask.all()):
        return images, image_mask
    if not bool(image_mask.any()):
        raise ImageError("every camera view is missing: at least one image is needed")
    return images[image_mask], image_mask[image_mask]


def prompt_buckets(max_tokens: int) -> tuple[int, ...]:
    return tuple(b for b in PROMPT_BUCKETS if b < max_tokens) + (max_tokens,)


class _Weights:
    """The canonical checkpoint dict turned into what the fast forward reads.

    Tensors are moved to the device one at a time and dropped from `sd` as they go, so
    loading a full checkpoint never holds two copies in host memory."""

    def __init__(self, config: PiConfig, sd: dict[str, torch.Tensor], device, dtype, fused_expert: bool):
        self.config, self.device, self.dtype = config, device, dtype
        self.fused_expert = fused_expert
        # The cuBLAS expert path (above 16 rows) attends with the small-M path's attention
        # kernel where it runs: 3x faster than the generic decode_attention at 50 tokens
        # (15 vs 47 us a layer on the H100, BENCHMARKS.md session 13).
        self.expert_attention_kernel = expert_ops.attention_runs_on_kernel(config.expert.head_dim, dtype, device)

        def take(name, to=dtype):
            return sd.pop(name).to(device=device, dtype=to)

        def linear(prefix, bias=True, to=dtype):
            return Linear(take(prefix + "weight", to), take(prefix + "bias", to) if bias else None, prefix)

        def fused(prefixes, bias=False):
            weight = torch.cat([take(p + "weight") for p in prefixes])
            return Linear(weight, torch.cat([take(p + "bias") for p in prefixes]) if bias else None, prefixes[0])

        vc, f32 = config.vision, torch.float32
        conv = take(VISION + "embeddings.patch_embedding.weight")
        self.patch_embed = Linear(conv.reshape(vc.width, -1), None, "patch_embedding")
        # Conv bias and position embedding are both per-patch constants: one add.
        self.patch_bias = (take(VISION + "embeddings.position_embedding.weight", f32)
                           + take(VISION + "embeddings.patch_embedding.bias", f32)).to(dtype)
        self.vision_layers = []
        for i in range(vc.depth):
            p = f"{VISION}encoder.layers.{i}."
            self.vision_layers.append(dict(
                ln1=(take(p + "layer_norm1.weight", f32), take(p + "layer_norm1.bias", f32)),
                qkv=fused([p + f"self_attn.{n}_proj." for n in "qkv"], bias=True),
                out=linear(p + "self_attn.out_proj."),
                ln2=(take(p + "layer_norm2.weight", f32), take(p + "layer_norm2.bias", f32)),
                fc1=linear(p + "mlp.fc1."), fc2=linear(p + "mlp.fc2.")))
        self.post_ln = (take(VISION + "post_layernorm.weight", f32), take(VISION + "post_layernorm.bias", f32))
        self.projector = linear(PROJECTOR)

        # Out of place: `take` may hand back the caller's own tensor (already on device).
        self.embed_tokens = take(VLM + "embed_tokens.weight") * torch.tensor(config.vlm.width**0.5, dtype=dtype)
        self.vlm_layers = [self._gemma_layer(f"{VLM}layers.{i}.", take, fused, adaptive=False)
                           for i in range(config.vlm.depth)]
        for key in ("o", "post_norm", "gate_up", "down"):  # the last prefix layer only makes K/V
            del self.vlm_layers[-1][key]
        sd.pop(VLM + "norm.weight", None)  # the prefix's final norm output is never read

        self.expert_layers = [self._gemma_layer(f"{EXPERT}layers.{i}.", take, fused, adaptive=config.pi05)
                              for i in range(config.expert.depth)]
        if fused_expert:
            for layer in self.expert_layers:
                self._pack_for_small_m(layer, config.expert)
        self.action_in = linear("action_in_proj.", to=f32)
        self.action_out = linear("action_out_proj.", to=f32)
        if config.pi05:
            self._precompute_adarms(take, linear)
        else:
            self.expert_final_norm = take(EXPERT + "norm.weight", f32)
            self.state_proj = linear("state_proj.", to=f32)
            self._precompute_action_time_mlp(take, linear)

    @staticmethod
    def _gemma_layer(p, take, fused, adaptive):
        layer = dict(
            qkv=fused([p + f"self_attn.{n}_proj." for n in "qkv"]),
            o=Linear(take(p + "self_attn.o_proj.weight"), None, p + "self_attn.o_proj"),
            gate_up=fused([p + "mlp.gate_proj.", p + "mlp.up_proj."]),
            down=Linear(take(p + "mlp.down_proj.weight"), None, p + "mlp.down_proj"))
        if not adaptive:
            layer["in_norm"] = take(p + "input_layernorm.weight", torch.float32)
            layer["post_norm"] = take(p + "post_attention_layernorm.weight", torch.float32)
        else:
            layer["in_dense"] = (take(p + "input_layernorm.dense.weight", torch.float32),
                                 take(p + "input_layernorm.dense.bias", torch.float32))
            layer["post_dense"] = (take(p + "post_attention_layernorm.dense.weight", torch.float32),
                                   take(p + "post_attention_layernorm.dense.bias", torch.float32))
        return layer

    @staticmethod
    def _pack_for_small_m(layer, ec) -> None:
        """Expert weights in the row order of the small-M kernels' epilogues (RoPE pairs,
        gate/up pairs). They stay bf16 in every precision: at 10 rows FP8 weights (W8A16)
        saved ~3% of the expert's time on the H100 and cost accuracy."""
        q, k, v = layer.pop("qkv").weight.split([ec.num_heads * ec.head_dim, ec.num_kv_heads * ec.head_dim,
                                                  ec.num_kv_heads * ec.head_dim])
        gate, up = layer.pop("gate_up").weight.chunk(2)
        packed = {"qkv": expert_ops.pack_qkv_rope(q, k, v, ec.head_dim), "gate_up": expert_ops.pack_gate_up(gate, up),
                  "o": layer.pop("o").weight, "down": layer.pop("down").weight}
        for key, weight in packed.items():
            layer[key], layer[key + "_scale"] = weight.contiguous(), None

    def _time_embeddings(self) -> torch.Tensor:
        width = self.config.expert.width
        return torch.cat([time_embedding(t, width) for t in flow_times(self.config.num_steps)]).to(self.device)

    def _precompute_adarms(self, take, linear):
        """Pi0.5: the adaRMS condition depends only on t, so every norm's (scale, shift, gate)
        is fixed per step: mods [steps, layers, 2 (input, post), 3, width] and final [steps, 3, width]."""
        time_in, time_out = linear("time_mlp_in.", to=torch.float32), linear("time_mlp_out.", to=torch.float32)
        temb = self._time_embeddings()
        cond = F.silu(F.linear(F.silu(F.linear(temb, time_in.weight, time_in.bias)), time_out.weight, time_out.bias))
        steps, width = cond.shape[0], self.config.expert.width

        def modulation(dense):
            return F.linear(cond, *dense).view(steps, 3, width)

        self.adarms = torch.stack([torch.stack([modulation(layer.pop("in_dense")), modulation(layer.pop("post_dense"))], 1)
                                   for layer in self.expert_layers], 1).contiguous()
        final = (take(EXPERT + "norm.dense.weight", torch.float32), take(EXPERT + "norm.dense.bias", torch.float32))
        self.adarms_final = modulation(final).contiguous()

    def _precompute_action_time_mlp(self, take, linear):
        """Pi0: action_time_mlp_in(cat[a, temb]) = W_a a + (W_t temb + b), the bracket per step."""
        width = self.config.expert.width
        weight = take("action_time_mlp_in.weight", torch.float32)
        bias = take("action_time_mlp_in.bias", torch.float32)
        self.action_time_in = Linear(weight[:, :width].contiguous(), None, "action_time_mlp_in")
        self.action_time_step_bias = (F.linear(self._time_embeddings(), weight[:, width:]) + bias).contiguous()
        self.action_time_out = linear("action_time_mlp_out.", to=torch.float32)


class StagingBlock:
    """Named device tensors carved from one byte buffer, each 16-byte aligned, mirrored by
    the same layout in pinned host memory: the host writes the views of `host`, then one
    `upload()` moves them all (on a CPU device the two are the same memory)."""

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device):
        layout, size = {}, 0
        for name, (shape, dtype) in fields.items():
            nbytes = int(np.prod(shape)) * dtype.itemsize
            layout[name] = (size, nbytes, shape, dtype)
            size += -(-nbytes // 16) * 16
        self._device_bytes = torch.zeros(size, dtype=torch.uint8, device=device)
        self._host_bytes = (self._device_bytes if device.type == "cpu"
                            else torch.zeros(size, dtype=torch.uint8, pin_memory=True))

        def views(buffer):
            return {name: buffer[o:o + n].view(dtype).view(shape) for name, (o, n, shape, dtype) in layout.items()}
        self.device, self.host = views(self._device_bytes), views(self._host_bytes)
        # numpy views of `host`: the per-call writes are small numpy stores, which keep the
        # GIL (a torch op releases and re-takes it, and waits for it when the executor
        # thread holds it)
        self.host_arrays = {name: t.numpy() for name, t in self.host.items()}

    def upload(self) -> None:
        if self._host_bytes is not self._device_bytes:
            self._device_bytes.copy_(self._host_bytes, non_blocking=True)


@functools.lru_cache(maxsize=None)
def flash_varlen_works(device: torch.device, head_dim: int) -> bool:
    """Whether aten's flash-attention varlen kernel (with seqused_k) runs here: tried once
    per device and head_dim on a tiny input and compared with plain softmax attention."""
    try:
        packed = torch.randn(5, 4, head_dim, device=device, dtype=torch.bfloat16)  # [tokens, 2 q + k + v heads]
        q, k, v = packed[:, :2], packed[:, 2:3], packed[:, 3:]
        bounds = torch.tensor([0, 5], dtype=torch.int32, device=device)
        used = torch.tensor([3], dtype=torch.int32, device=device)
        out = torch.ops.aten._flash_attention_forward(q, k, v, bounds, bounds, 5, 5, 0.0, False, False, scale=1.0,
                                                       seqused_k=used)[0]
        scores = torch.einsum("qhd,kd->hqk", q.float(), k[:3, 0].float()).softmax(-1)
        expected = torch.einsum("hqk,kd->qhd", scores, v[:3, 0].float())
        return bool(torch.allclose(out.float(), expected, atol=3e-2, rtol=3e-2))
    except (RuntimeError, AttributeError, TypeError) as e:
        log.info("flash-attention varlen unavailable (%s): prefix attention through SDPA", e)
        return False


class _Session:
    """Static buffers for one number of views, sized for the largest prompt bucket; every
    bucket's graph works on leading slices of them (only one graph runs at a time)."""

    def __init__(self, w: _Weights, views: int, max_bucket: int):
        cfg, dev, dt = w.config, w.device, w.dtype
        vc, gc, ec = cfg.vision, cfg.vlm, cfg.expert
        self.views = views
        self.image_tokens = views * vc.num_patches
        self.suffix_len = cfg.action_horizon + (0 if cfg.pi05 else 1)
        self.max_prefix = self.image_tokens + max_bucket
        max_keys = self.max_prefix + self.suffix_len

        def buf(*shape, dtype=dt):
            return torch.zeros(shape, dtype=dtype, device=dev)

        # Per-call inputs, carved from one staging block (one host-to-device copy). Suffix
        # token groups by first row, each with its RoPE positions and first KV-cache row
        # (16-byte aligned tensors of their own: the small-M kernels read them on device).
        # Pi0: flow step 0 runs the state token with the actions (rows 0 .. H), later steps
        # the actions alone (rows 1 .. H) against the state's cached K/V.
        groups = [(0, cfg.action_horizon)] if cfg.pi05 else [(0, self.suffix_len), (1, cfg.action_horizon)]
        fields = {
            "tokens": ((max_bucket,), torch.int64),
            "key_bias": ((max_keys,), torch.float32),       # 0 valid, MASKED_LOGIT masked
            "positions": ((self.max_prefix,), torch.int32),  # RoPE positions of the prefix
            "valid_keys": ((1,), torch.int32),               # leading valid prefix keys
            "state": ((1, cfg.state_dim), torch.float32),
            "noise": ((cfg.action_horizon, cfg.action_dim), torch.float32),
            **{f"positions_{first}": ((rows,), torch.int32) for first, rows in groups},
            **{f"cache_row_{first}": ((1,), torch.int32) for first, _ in groups}}
        self.inputs = StagingBlock(fields, dev)
        self.images = buf(views, vc.image_size, vc.image_size, 3, dtype=torch.uint8)
        self.images_host = self.images if dev.type == "cpu" else torch.empty_like(self.images, device="cpu",
                                                                                  pin_memory=True)
        d = self.inputs.device
        self.tokens, self.key_bias, self.positions, self.valid_keys = (
            d["tokens"], d["key_bias"], d["positions"], d["valid_keys"])
        self.state, self.noise = d["state"], d["noise"]
        self.group_positions = {first: d[f"positions_{first}"] for first, _ in groups}
        self.group_cache_row = {first: d[f"cache_row_{first}"] for first, _ in groups}
        # vision
        n_img = self.image_tokens
        self.patches = buf(n_img, 3 * vc.patch_size**2)
        self.v_res, self.v_h, self.v_o = buf(n_img, vc.width), buf(n_img, vc.width), buf(n_img, vc.width)
        self.v_qkv, self.v_attn, self.v_mlp = buf(n_img, 3 * vc.width), buf(n_img, vc.width), buf(n_img, vc.mlp_dim)
        # prefix (Gemma 2B); rows [0, image_tokens) are images, then prompt tokens
        p = self.max_prefix
        self.g_res, self.g_h, self.g_o = buf(p, gc.width), buf(p, gc.width), buf(p, gc.width)
        self.g_qkv = buf(p, (gc.num_heads + 2 * gc.num_kv_heads) * gc.head_dim)
        self.g_q, self.g_gu, self.g_mlp = buf(p, gc.num_heads, gc.head_dim), buf(p, 2 * gc.mlp_dim), buf(p, gc.mlp_dim)
        # shared KV cache: per layer [keys, kv_heads, head_dim]; prefix rows then suffix rows
        self.k_cache = buf(gc.depth, max_keys, gc.num_kv_heads, gc.head_dim)
        self.v_cache = buf(gc.depth, max_keys, gc.num_kv_heads, gc.head_dim)
        cos, sin = rope_tables(torch.arange(max_keys, device=dev)[None], gc.head_dim, gc.rope_theta)
        self.rope_cos, self.rope_sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()
        # expert (action tokens; Pi0's state token is row 0)
        s = self.suffix_len
        self.x_t = buf(cfg.action_horizon, cfg.action_dim, dtype=torch.float32)
        self.a_emb = buf(cfg.action_horizon, ec.width, dtype=torch.float32)
        self.a_mlp = buf(cfg.action_horizon, ec.width, dtype=torch.float32)
        self.e_res, self.e_h, self.e_o = buf(s, ec.width), buf(s, ec.width), buf(s, ec.width)
        self.e_qkv = buf(s, (ec.num_heads + 2 * ec.num_kv_heads) * ec.head_dim)
        self.e_q, self.e_attn = buf(s, ec.num_heads, ec.head_dim), buf(s, ec.num_heads, ec.head_dim)
        self.e_gu, self.e_mlp = buf(s, 2 * ec.mlp_dim), buf(s, ec.mlp_dim)
        # Pi0's step 0: a key bias per row (the state token must not see the actions), rows
        # of `keys` floats back to back for the bucket's key count (the generic attention
        # reads rows of exactly `keys`).
        self.state_step_bias = None if cfg.pi05 else buf(s * max_keys, dtype=torch.float32)
        # The generic decode_attention's workspace layout depends on the token count: one per
        # token group (Pi0's step 0, with the state token, and its later steps must not share
        # one). The expert's attention kernel merges its splits on chip and needs none.
        self.attn_workspace = {} if w.fused_expert or w.expert_attention_kernel else {
            first: ops.decode_attention_workspace(
                (rows, ec.num_heads, ec.head_dim), (max_keys, ec.num_kv_heads, ec.head_dim), dev)
            for first, rows in groups}

        self.graphs: dict[int, CapturedForward] = {}
        # prefix attention through flash-attention varlen (see PiGraphRuntime._prefix_attention)
        # (SigLIP too: flash_varlen_works tries packed, strided q / k / v of both head dims)
        self.flash_varlen = dev.type == "cuda" and all(flash_varlen_works(dev, d) for d in (gc.head_dim, vc.head_dim))
        self.flash_bounds: dict[int, torch.Tensor] = {}
        self.view_bounds = torch.arange(0, n_img + 1, vc.num_patches, dtype=torch.int32, device=dev)
        self.fused_gelu = addmm_gelu_is_tanh(dev)


class PiGraphRuntime:
    """Backend with PiModel's `sample_actions` signature (docs/ARCHITECTURE.md)."""

    def __init__(self, config: PiConfig, weights: _Weights, device: torch.device, precision: str,
                 max_views: int = 3):
        self.config, self.w, self.device, self.precision = config, weights, device, precision
        self.buckets = prompt_buckets(config.max_token_len)
        self.max_views = max_views
        self.use_graphs = device.type == "cuda"
        self._sessions: dict[int, _Session] = {}
        self._pool = None
        self._host_out = torch.empty(config.action_horizon, config.action_dim, dtype=torch.float32,
                                     pin_memory=self.use_graphs)
        self._done = torch.cuda.Event() if self.use_graphs else None
        # FP8: GEMMs run bf16 until calibration has measured their input ranges.
        self.fp8_ready = False
        if precision == "fp8":
            largest = max(lin.weight.shape[1] for _, _, lin in self._fp8_targets())
            rows = max_views * config.vision.num_patches + self.buckets[-1]
            self._fp8_scratch = torch.empty(rows * largest, dtype=torch.float8_e4m3fn, device=device)

    @classmethod
    def from_state_dict(cls, config: PiConfig, state_dict: dict[str, torch.Tensor], *, device,
                        precision="bf16", max_views: int = 3, expert_path: str = "auto"):
        """expert_path: "small_m" (fused small-M kernels: norm prologue, RoPE / GeGLU /
        gated-residual epilogues, 5 launches a layer), "gemm" (cuBLAS + fused elementwise
        ops), or "auto" (small_m for bf16 / fp8 where the kernels run and the horizon is short
        enough for them to beat cuBLAS)."""
        device = torch.device(device)
        if precision not in COMPUTE_DTYPES:
            raise ValueError(f"precision {precision!r} is not one of {sorted(COMPUTE_DTYPES)}")
        # FP8 on the CPU runs through torch's CPU _scaled_mm: slow, there to test the FP8 graph
        # code without a GPU (Policy never picks it: resolve_precision wants a GPU for fp8).
        if precision == "fp8" and device.type != "cpu" and not fp8_capable(device):
            raise ValueError(f"fp8 needs a GPU of compute capability 8.9 or newer, not {device}")
        dtype = COMPUTE_DTYPES[precision]
        rows = config.action_horizon + (0 if config.pi05 else 1)
        ec = config.expert
        on_kernels = expert_ops.layer_runs_on_kernels(rows, ec.width, ec.mlp_dim, ec.num_heads, ec.num_kv_heads,
                                                      ec.head_dim, device)
        if expert_path == "auto":
            short = rows <= SMALL_M_MAX_ROWS
            expert_path = "small_m" if dtype == torch.bfloat16 and on_kernels and short else "gemm"
        if expert_path not in ("small_m", "gemm"):
            raise ValueError(f"expert_path must be auto, small_m or gemm, got {expert_path!r}")
        if expert_path == "small_m" and dtype != torch.bfloat16:
            raise ValueError("the small-M expert kernels take bf16 activations (precision bf16 or fp8)")
        if expert_path == "small_m" and device.type == "cuda" and not on_kernels:
            raise ValueError(f"the small-M expert kernels do not take this expert ({rows} tokens, width "
                             f"{ec.width}, head_dim {ec.head_dim}) on {device}: use expert_path 'gemm'")
        started = time.perf_counter()
        weights = _Weights(config, dict(state_dict), device, dtype, fused_expert=expert_path == "small_m")
        log.info("graph runtime: weights prepared on %s (%s) in %.1f s", device, precision,
                 time.perf_counter() - started)
        return cls(config, weights, device, precision, max_views)

    # -- FP8 ------------------------------------------------------------------------------

    def _fp8_targets(self):
        """(container, key, Linear) of every GEMM that runs in FP8: Gemma 2B over the prefix,
        where the time is (compute-bound GEMMs, ~1.7x faster in FP8 on the H100). SigLIP
        (small GEMMs, little gain) and the action expert (weight-bound at 10 rows, ~3% gain)
        stay bf16, which keeps the actions within the cosine gate."""
        for layer in self.w.vlm_layers:
            for key in ("qkv", "o", "gate_up", "down"):
                if key in layer:
                    yield layer, key, layer[key]

    def calibration(self) -> dict[str, float]:
        """The activation ranges (max |x| per FP8 GEMM input) measured so far."""
        return {lin.name: float(lin.amax) for _, _, lin in self._fp8_targets()}

    @torch.inference_mode()
    def calibrate(self, observations=(), amax: dict[str, float] | None = None) -> dict[str, float]:
        """Set the static FP8 activation scales: from `amax` (a cached calibration), or by
        running the forward eagerly on `observations` (sample_actions argument tuples) and
        keeping the max |x| seen at every FP8 GEMM input. Before the first calibration the
        GEMMs run in bf16, so the measured ranges are the unquantized model's; a later call
        (e.g. on real camera frames) measures through the FP8 model and only moves the scales,
        which the captured graphs read in place."""
        if self.precision != "fp8":
            raise ValueError("calibrate() applies to precision='fp8'")
        targets = list(self._fp8_targets())
        if amax is not None:
            missing = [lin.name for _, _, lin in targets if lin.name not in amax]
            if missing:
                raise ValueError(f"calibration lacks {len(missing)} GEMMs, e.g. {missing[:3]}")
            for _, _, lin in targets:
                lin.amax.fill_(amax[lin.name])
        else:
            observations = list(observations)
            if not observations:
                raise ValueError("calibrate() needs observations or amax")
            for _, _, lin in targets:
                lin.amax.zero_()
            Linear.recording = True
            try:
                for observation in observations:
                    self._forward(*self._stage(*observation))
            finally:
                Linear.recording = False
        if not self.fp8_ready:
            for container, key, lin in targets:
                container[key] = Fp8Linear(lin, self._fp8_scratch)
            self.fp8_ready = True
            torch.cuda.empty_cache()  # the bf16 copies of those weights are gone
        else:
            for _, _, lin in targets:
                lin.set_scale_from_amax()
        return self.calibration()

    # -- the forward, over one session's buffers ------------------------------------------

    def _vision(self, s: _Session) -> None:
        w, vc = self.w, self.config.vision
        ops.images_to_patches(s.images, vc.patch_size, out=s.patches)
        w.patch_embed(s.patches, out=s.v_o)
        s.v_res.view(s.views, vc.num_patches, vc.width).copy_(w.patch_bias)
        for layer in w.vision_layers:
            # residual += previous output (layer 0: the patch embedding onto bias + position)
            ops.add_layer_norm(s.v_o, s.v_res, *layer["ln1"], out=s.v_h)
            layer["qkv"](s.v_h, out=s.v_qkv)
            layer["out"](self._vision_attention(s), out=s.v_o)
            ops.add_layer_norm(s.v_o, s.v_res, *layer["ln2"], out=s.v_h)
            if s.fused_gelu:
                layer["fc1"].gelu_tanh(s.v_h, out=s.v_mlp)
            else:
                layer["fc1"](s.v_h, out=s.v_mlp)
                ops.gelu_tanh(s.v_mlp, out=s.v_mlp)
            layer["fc2"](s.v_mlp, out=s.v_o)
        ops.add_layer_norm(s.v_o, s.v_res, *w.post_ln, out=s.v_h)
        w.projector(s.v_h, out=s.g_res[:s.image_tokens])

    def _vision_attention(self, s: _Session) -> torch.Tensor:
        """Each view's patches attend to that view's patches (no mask), from the packed QKV
        [patches, 3, heads, head_dim]; returns [patches, width]. On CUDA flash-attention
        varlen (one sequence per view) reads q / k / v in place and writes the layout the
        out projection takes; elsewhere SDPA over [views, heads, patches, head_dim]."""
        vc = self.config.vision
        qkv = s.v_qkv.view(s.image_tokens, 3, vc.num_heads, vc.head_dim)
        if s.flash_varlen:
            out = torch.ops.aten._flash_attention_forward(
                qkv[:, 0], qkv[:, 1], qkv[:, 2], s.view_bounds, s.view_bounds, vc.num_patches, vc.num_patches,
                0.0, False, False, scale=vc.head_dim**-0.5)[0]
            return out.view(s.image_tokens, vc.width)
        q, k, v = qkv.view(s.views, vc.num_patches, 3, vc.num_heads, vc.head_dim).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        s.v_attn.view(s.views, vc.num_patches, vc.num_heads, vc.head_dim).copy_(attn.transpose(1, 2))
        return s.v_attn

    def _prefix(self, s: _Session, prefix_len: int) -> None:
        """Gemma 2B over [image tokens | prompt bucket]; fills rows [0, prefix_len) of the KV cache."""
        w, gc = self.w, self.config.vlm
        n = prefix_len
        res, h, o, qkv, q, gu, mlp = (t[:n] for t in (s.g_res, s.g_h, s.g_o, s.g_qkv, s.g_q, s.g_gu, s.g_mlp))
        torch.index_select(w.embed_tokens, 0, s.tokens[:n - s.image_tokens], out=res[s.image_tokens:])
        attend = self._prefix_attention(s, n)
        # Norms and GeGLU write each GEMM's input in its own format: bf16, or (FP8) already
        # quantized with the GEMM's static scale (gemm_input).
        for i, layer in enumerate(w.vlm_layers):
            # `o` holds the previous layer's MLP output: add it to the residual, then norm
            x, x_scale = gemm_input(layer["qkv"], h)
            if i == 0:
                ops.rms_norm(res, layer["in_norm"], out=x, out_scale=x_scale)
            else:
                ops.add_rms_norm(o, res, layer["in_norm"], out=x, out_scale=x_scale)
            layer["qkv"](x, out=qkv)
            ops.qkv_rope_split(qkv, s.rope_cos, s.rope_sin, s.positions[:n], s.k_cache[i], s.v_cache[i],
                               cache_offset=0, q_scale=gc.head_dim**-0.5, out=q)
            if i == len(w.vlm_layers) - 1:
                break  # only this layer's K/V are ever read
            layer["o"](attend(q, s.k_cache[i, :n], s.v_cache[i, :n]).reshape(n, -1), out=o)
            x, x_scale = gemm_input(layer["gate_up"], h)
            ops.add_rms_norm(o, res, layer["post_norm"], out=x, out_scale=x_scale)
            layer["gate_up"](x, out=gu)
            x, x_scale = gemm_input(layer["down"], mlp)
            ops.gelu_tanh_mul(gu, out=x, out_scale=x_scale)
            layer["down"](x, out=o)

    def _prefix_attention(self, s: _Session, n: int):
        """attend(q [n, H, D], k / v [n, KV, D]) -> [n, H, D] over the prefix's valid keys.

        Valid keys are always the leading ones: missing views are dropped before the forward
        (sample_actions) and prompt padding is last. So on CUDA the flash-attention varlen
        kernel reads only the first `valid_keys` keys (a device int: one graph serves every
        prompt length in the bucket), with no mask and no transposes. Elsewhere: SDPA with
        the additive key mask."""
        gc = self.config.vlm
        if s.flash_varlen:
            if n not in s.flash_bounds:  # made in the warm-up run, before any capture
                s.flash_bounds[n] = torch.tensor([0, n], dtype=torch.int32, device=self.device)
            bounds = s.flash_bounds[n]

            def attend(q, k, v):
                return torch.ops.aten._flash_attention_forward(
                    q, k, v, bounds, bounds, n, n, 0.0, False, False, scale=1.0, seqused_k=s.valid_keys)[0]
            return attend
        mask = s.key_bias[:n].to(self.w.dtype).view(1, 1, 1, n).expand(1, gc.num_heads, n, n)

        def attend(q, k, v):
            keys, values = (t.transpose(0, 1)[None].expand(1, gc.num_heads, n, gc.head_dim) for t in (k, v))
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask, scale=1.0)
            return out[0].transpose(0, 1)
        return attend

    def _expert_norm(self, layer: int, which: int, step: int):
        """(norm, gate of the residual add after its block) of the input (which=0) or
        post-attention (1) norm of expert `layer`; layer == depth: the final norm.
        Pi0.5: adaRMS with the flow step's precomputed (scale, shift, gate); Pi0: RMSNorm
        with its weight, no gate."""
        w = self.w
        depth = len(w.expert_layers)
        if self.config.pi05:
            scale, shift, gate = w.adarms[step, layer, which] if layer < depth else w.adarms_final[step]
            return AdaRmsNorm(scale, shift), gate
        weight = (w.expert_layers[layer]["in_norm" if which == 0 else "post_norm"] if layer < depth
                  else w.expert_final_norm)
        return RmsNorm(weight), None

    def _suffix_bias(self, s: _Session, keys: int, first: int, rows: int) -> torch.Tensor:
        """Attention bias of suffix rows [first, first + rows) over the first `keys` keys:
        the shared key bias, or Pi0's step-0 bias (one row each: the state token's masks
        the actions), which _forward writes."""
        if first == 0 and s.state_step_bias is not None:
            return s.state_step_bias[:rows * keys].view(rows, keys)
        return s.key_bias[:keys]

    def _expert(self, s: _Session, prefix_len: int, first: int, rows: int, step: int) -> None:
        """Expert layers over suffix rows [first, first + rows) of e_res, whose K/V go to
        cache rows prefix_len + first ...; they attend to the valid prefix, the suffix rows
        before them and their own rows (_suffix_bias). Leaves the residual stream in e_res:
        the final norm is the flow step's (velocity_euler_embed)."""
        if self.w.fused_expert:
            return self._expert_small_m(s, prefix_len, first, rows, step)
        w, ec = self.w, self.config.expert
        res, h, o, qkv, q, attn, gu, mlp = (t[first:first + rows] for t in (
            s.e_res, s.e_h, s.e_o, s.e_qkv, s.e_q, s.e_attn, s.e_gu, s.e_mlp))
        row0 = prefix_len + first
        keys = row0 + rows
        positions, bias = s.group_positions[first], self._suffix_bias(s, keys, first, rows)
        depth = len(w.expert_layers)

        def norm(which: int, layer: int, added: torch.Tensor | None, gate_of: tuple[int, int]):
            """Input (which=0) / post-attention (1) norm of `layer` (depth: the final norm),
            optionally first adding `added` to the residual, gated by norm `gate_of`'s gate."""
            gate = None if added is None else self._expert_norm(*gate_of, step)[1]
            apply_norm(self._expert_norm(layer, which, step)[0], res, h, added, gate)

        for i, layer in enumerate(w.expert_layers):
            # `o` holds the previous layer's MLP output (see the end of the loop)
            norm(0, i, None if i == 0 else o, (i - 1, 1))
            layer["qkv"](h, out=qkv)
            ops.qkv_rope_split(qkv, s.rope_cos, s.rope_sin, positions, s.k_cache[i], s.v_cache[i],
                               cache_offset=row0, q_scale=ec.head_dim**-0.5, out=q)
            if w.expert_attention_kernel:  # K/V rows before this group's are loaded early under PDL
                expert_ops.decode_attention(q, s.k_cache[i, :keys], s.v_cache[i, :keys], bias=bias, scale=1.0,
                                            out=attn, launch=AttentionLaunch(pdl=self._pdl), stable_keys=row0)
            else:
                ops.decode_attention(q, s.k_cache[i, :keys], s.v_cache[i, :keys], bias, scale=1.0, out=attn,
                                     workspace=s.attn_workspace[first])
            layer["o"](attn.view(rows, -1), out=o)
            norm(1, i, o, (i, 0))
            layer["gate_up"](h, out=gu)
            ops.gelu_tanh_mul(gu, out=mlp)
            layer["down"](mlp, out=o)
        gate = self._expert_norm(depth - 1, 1, step)[1]
        if gate is None:
            res.add_(o)
        else:
            ops.gated_add(o, res, gate)

    def _expert_small_m(self, s: _Session, prefix_len: int, first: int, rows: int, step: int) -> None:
        """`_expert` with the small-M kernels: per layer 5 launches, each reading its weights
        once; norms run as GEMM prologues, RoPE + KV-cache write, GeGLU and the gated residual
        as epilogues. PDL lets each kernel start loading weights while the previous drains."""
        w, ec = self.w, self.config.expert
        res, q, attn, mlp = (t[first:first + rows] for t in (s.e_res, s.e_q, s.e_attn, s.e_mlp))
        keys = prefix_len + first + rows
        positions, cache_row = s.group_positions[first], s.group_cache_row[first]
        bias = self._suffix_bias(s, keys, first, rows)
        lin, att = LinearLaunch(pdl=self._pdl), AttentionLaunch(pdl=self._pdl)

        for i, layer in enumerate(w.expert_layers):
            norm, gate_attn = self._expert_norm(i, 0, step)
            expert_ops.linear_qkv_rope(res, layer["qkv"], w_scale=layer["qkv_scale"], norm=norm, cos=s.rope_cos,
                                       sin=s.rope_sin, positions=positions, k_cache=s.k_cache[i],
                                       v_cache=s.v_cache[i], cache_offset=cache_row, q_out=q,
                                       q_scale=ec.head_dim**-0.5, launch=lin)
            # Only this group's K/V rows come from the QKV launch just before; the older
            # rows and the bias are loaded while that launch drains.
            expert_ops.decode_attention(q, s.k_cache[i, :keys], s.v_cache[i, :keys], bias=bias, scale=1.0,
                                        out=attn, launch=att, stable_keys=keys - rows)
            expert_ops.linear_gated_residual(attn.view(rows, -1), layer["o"], res, gate=gate_attn,
                                             w_scale=layer["o_scale"], launch=lin)
            norm, gate_mlp = self._expert_norm(i, 1, step)
            expert_ops.linear_gelu_mul(res, layer["gate_up"], w_scale=layer["gate_up_scale"], norm=norm, out=mlp,
                                       launch=lin)
            expert_ops.linear_gated_residual(mlp, layer["down"], res, gate=gate_mlp, w_scale=layer["down_scale"],
                                             launch=lin)

    @property
    def _pdl(self) -> bool:
        """Programmatic dependent launch for the expert kernels (graphs only). FLASHRT_PDL=0
        turns it off, so a profiler shows each kernel's own time instead of time
        overlapped with its predecessor."""
        return self.use_graphs and os.environ.get("FLASHRT_PDL", "1") == "1"

    def _flow_step(self, s: _Session, prefix_len: int, first_action: int, step: int) -> None:
        """x_t <- x_t + dt * v(x_t, t_step). The action rows of e_res hold the embedded x_t
        (Pi0.5: written by the previous step's velocity_euler_embed, or _forward's);
        after the expert one op runs its final norm, the velocity head, the Euler step and
        (Pi0.5, all but the last step) the next step's embedding. Pi0's step 0 also runs
        the state token (row 0, written by _forward): its K/V serve every later step, and
        the expert's launches cost the same for one more row."""
        cfg, w = self.config, self.w
        horizon = cfg.action_horizon
        actions = s.e_res[first_action:first_action + horizon]
        if not cfg.pi05:  # Pi0 mixes in the time: W_a a + (W_t temb_step + b), swish, out proj
            w.action_in(s.x_t, out=s.a_emb)
            torch.addmm(w.action_time_step_bias[step], s.a_emb, w.action_time_in.weight.t(), out=s.a_mlp)
            F.silu(s.a_mlp, inplace=True)
            w.action_time_out(s.a_mlp, out=s.a_emb)
            actions.copy_(s.a_emb)
        first = 0 if step == 0 else first_action
        self._expert(s, prefix_len, first, first_action + horizon - first, step)
        embed_next = cfg.pi05 and step + 1 < cfg.num_steps
        expert_ops.velocity_euler_embed(
            s.x_t, res=actions, norm=self._expert_norm(len(w.expert_layers), 0, step)[0], w_out=w.action_out.weight,
            b_out=w.action_out.bias, dt=float(np.float32(-1.0 / cfg.num_steps)),
            w_in=w.action_in.weight if embed_next else None, b_in=w.action_in.bias if embed_next else None,
            out=actions if embed_next else None, launch=LinearLaunch(pdl=self._pdl))

    def _forward(self, s: _Session, bucket: int) -> None:
        cfg, w = self.config, self.w
        prefix_len = s.image_tokens + bucket
        self._vision(s)
        self._prefix(s, prefix_len)
        first_action = 0
        if not cfg.pi05:  # Pi0: the state token, row 0 of flow step 0
            w.state_proj(s.state, out=s.a_emb[:1])
            s.e_res[:1].copy_(s.a_emb[:1])
            # step 0's bias: every row sees the valid prefix; the state token sees itself,
            # the actions see the state and each other (prefix-LM mask, suffix_ar)
            keys = prefix_len + s.suffix_len
            bias = self._suffix_bias(s, keys, 0, s.suffix_len)
            bias.copy_(s.key_bias[:keys].expand(s.suffix_len, keys))
            bias[0, prefix_len + 1:].fill_(MASKED_LOGIT)
            first_action = 1
        s.x_t.copy_(s.noise)
        if cfg.pi05:  # the first step's embedding; each step's op embeds the next one
            expert_ops.velocity_euler_embed(s.x_t, w_in=w.action_in.weight, b_in=w.action_in.bias,
                                            out=s.e_res[:cfg.action_horizon], launch=LinearLaunch(pdl=self._pdl))
        for step in range(cfg.num_steps):
            self._flow_step(s, prefix_len, first_action, step)

    # -- host side ------------------------------------------------------------------------

    def _session(self, views: int) -> _Session:
        if views > self.max_views:
            raise ValueError(f"{views} views; this runtime was built for at most {self.max_views}")
        if views not in self._sessions:
            self._sessions[views] = _Session(self.w, views, self.buckets[-1])
        return self._sessions[views]

    def _bucket(self, valid_tokens: int) -> int:
        for bucket in self.buckets:
            if valid_tokens <= bucket:
                return bucket
        return self.buckets[-1]

    def _stage(self, images, image_mask, tokens, token_mask, state, noise) -> tuple[_Session, int]:
        """Drop missing views, pick the session and prompt bucket, stage the inputs."""
        images, image_mask = present_views(images, image_mask)
        s = self._session(images.shape[0])
        bucket = self._bucket(int(_host(token_mask).sum()))
        self._stage_inputs(s, bucket, images, image_mask, tokens, token_mask, state, noise)
        return s, bucket

    def _stage_inputs(self, s: _Session, bucket: int, images, image_mask, tokens, token_mask, state, noise):
        """Write one observation into the session's pinned staging block and start its copy
        to the device (stream-ordered, no host sync). Every view is present here (masked
        views were dropped), so the prefix is [images | prompt bucket] with the prompt's
        padding last."""
        h = s.inputs.host_arrays
        prompt_valid = _host(token_mask)[:bucket].astype(bool)
        prefix_len = s.image_tokens + bucket
        valid = s.image_tokens + int(prompt_valid.sum())
        h["tokens"][:bucket] = _host(tokens)[:bucket]
        bias = h["key_bias"]
        bias[:prefix_len + s.suffix_len] = 0.0
        bias[s.image_tokens:prefix_len][~prompt_valid] = MASKED_LOGIT
        positions = h["positions"]
        positions[:s.image_tokens] = np.arange(s.image_tokens)
        # Padding takes the last valid position (never used: it is masked as a key).
        positions[s.image_tokens:prefix_len] = np.maximum(np.cumsum(prompt_valid) + s.image_tokens - 1, 0)
        h["valid_keys"][0] = valid
        for first in s.group_positions:
            group = h[f"positions_{first}"]
            group[:] = np.arange(valid + first, valid + first + group.shape[0])
            h[f"cache_row_{first}"][0] = prefix_len + first
        h["state"][0] = _host(state)
        h["noise"][:] = _host(noise)
        s.inputs.upload()
        if s.images_host is not s.images:
            # numpy's copy: one thread. torch would split these ~0.3 MB over its intra-op
            # pool, and waking that pool cost ~0.5 ms a call on a 16-core GPU host.
            np.copyto(s.images_host.numpy(), images.numpy())
            s.images.copy_(s.images_host, non_blocking=True)
        else:
            s.images.copy_(images)

    @torch.inference_mode()
    def prepare(self, views: int, buckets=None, fewer_views: bool = True) -> None:
        """Capture the graphs of `views` (and, with fewer_views, of every smaller view count,
        which a missing camera runs on) for the given (default: all) prompt buckets now, so
        no capture happens on the realtime path later (FP8: after calibration)."""
        if not self.use_graphs or (self.precision == "fp8" and not self.fp8_ready):
            return
        for count in range(1 if fewer_views else views, views + 1):
            s = self._session(count)
            for bucket in buckets or self.buckets:
                self._capture(s, bucket)

    def _capture(self, s: _Session, bucket: int) -> CapturedForward:
        if bucket not in s.graphs:
            started = time.perf_counter()
            s.graphs[bucket] = CapturedForward(lambda: self._forward(s, bucket), self.device, pool=self._pool)
            self._pool = s.graphs[bucket].pool
            log.info("graph runtime: captured views=%d prompt<=%d in %.2f s", s.views, bucket,
                     time.perf_counter() - started)
        return s.graphs[bucket]

    @torch.inference_mode()
    def sample_actions(self, images, image_mask, tokens, token_mask, state, noise) -> torch.Tensor:
        if self.precision == "fp8" and not self.fp8_ready:
            raise RuntimeError("FP8 runtime is not calibrated: call calibrate() first")
        with torch.cuda.device(self.device) if self.use_graphs else contextlib.nullcontext():
            s, bucket = self._stage(images, image_mask, tokens, token_mask, state, noise)
            if self.use_graphs:
                self._capture(s, bucket).replay()
                self._host_out.copy_(s.x_t, non_blocking=True)
                self._done.record()
                self._done.synchronize()
                return self._host_out.clone()
            self._forward(s, bucket)
            return s.x_t.clone()
