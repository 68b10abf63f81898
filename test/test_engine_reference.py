"""PiModel.sample_actions vs a straightforward re-derivation written here with plain torch ops
from the checkpoint's tensors (no flashrt_core model code): masks from python loops,
HF-style rotate_half RoPE, explicit softmax attention, the openpi sampling loop."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine_checkpoints import tiny_checkpoint  # noqa: F401
from flashrt_core.checkpoint import load_state_dict, read_checkpoint
from flashrt_core.models.pi0 import PiModel

VIS = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
LLM = "paligemma_with_expert.paligemma.model.language_model."
EXP = "paligemma_with_expert.gemma_expert.model."


def gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def linear(w, p, x):
    return x @ w[p + ".weight"].T + (w[p + ".bias"] if p + ".bias" in w else 0)


def softmax_attention(q, k, v, allowed):
    """q [H, T, D], k/v [H, S, D], allowed bool [T, S]."""
    logits = q @ k.transpose(-1, -2)
    logits = torch.where(allowed, logits, torch.tensor(-1e30))
    return torch.softmax(logits, dim=-1) @ v


def siglip(w, pixels, heads):
    x = F.conv2d(pixels, w[VIS + "embeddings.patch_embedding.weight"], w[VIS + "embeddings.patch_embedding.bias"],
                 stride=w[VIS + "embeddings.patch_embedding.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2) + w[VIS + "embeddings.position_embedding.weight"]
    width = x.shape[-1]
    i = 0
    while VIS + f"encoder.layers.{i}.layer_norm1.weight" in w:
        p = VIS + f"encoder.layers.{i}."
        h = F.layer_norm(x, (width,), w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], 1e-6)
        q, k, v = (linear(w, p + f"self_attn.{n}_proj", h).unflatten(-1, (heads, -1)).transpose(1, 2) for n in "qkv")
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
        x = x + linear(w, p + "self_attn.out_proj", att.transpose(1, 2).flatten(2))
        h = F.layer_norm(x, (width,), w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], 1e-6)
        x = x + linear(w, p + "mlp.fc2", gelu(linear(w, p + "mlp.fc1", h)))
        i += 1
    return F.layer_norm(x, (width,), w[VIS + "post_layernorm.weight"], w[VIS + "post_layernorm.bias"], 1e-6)


def rms(x, weight=None):
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return y if weight is None else y * (1 + weight)


def rope(x, positions):
    d = x.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()
    rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rotated * sin


def gemma_layer(w, p, x, positions, allowed, heads, head_dim, cache=None, cond=None):
    """One decoder layer; cache = (k, v) of earlier tokens; returns (x, (k, v) of these tokens)."""
    def norm(name, h):
        if cond is None:
            return rms(h, w[p + name + ".weight"]), None
        scale, shift, gate = linear(w, p + name + ".dense", cond).chunk(3, -1)
        return rms(h) * (1 + scale) + shift, gate

    h, gate = norm("input_layernorm", x)
    q = rope(linear(w, p + "self_attn.q_proj", h).unflatten(-1, (heads, head_dim)).transpose(0, 1), positions)
    k = rope(linear(w, p + "self_attn.k_proj", h).unflatten(-1, (-1, head_dim)).transpose(0, 1), positions)
    v = linear(w, p + "self_attn.v_proj", h).unflatten(-1, (-1, head_dim)).transpose(0, 1)
    keys, values = (k, v) if cache is None else (torch.cat([cache[0], k], 1), torch.cat([cache[1], v], 1))
    att = softmax_attention(q / math.sqrt(head_dim), keys.expand(heads, -1, -1), values.expand(heads, -1, -1),
                            allowed)
    out = linear(w, p + "self_attn.o_proj", att.transpose(0, 1).flatten(1))
    x = x + (out if gate is None else out * gate)
    h, gate = norm("post_attention_layernorm", x)
    mlp = linear(w, p + "mlp.down_proj", gelu(linear(w, p + "mlp.gate_proj", h)) * linear(w, p + "mlp.up_proj", h))
    return x + (mlp if gate is None else mlp * gate), (k, v)


def rederived_sample(w, cfg, images, image_mask, tokens, token_mask, state, noise):
    pi05, heads, hd, horizon = cfg.pi05, cfg.vlm.num_heads, cfg.vlm.head_dim, cfg.action_horizon
    # Prefix: every valid token sees every valid token.
    img = linear(w, "paligemma_with_expert.paligemma.model.multi_modal_projector.linear",
                 siglip(w, images.permute(0, 3, 1, 2).float() / 255 * 2 - 1, cfg.vision.num_heads))
    text = w[LLM + "embed_tokens.weight"][tokens] * math.sqrt(cfg.vlm.width)
    x = torch.cat([img.flatten(0, 1), text])
    valid = [bool(m) for m in image_mask for _ in range(img.shape[1])] + [bool(m) for m in token_mask]
    positions = torch.tensor(np.cumsum(valid) - 1)
    allowed = torch.tensor([[a and b for b in valid] for a in valid])
    caches = []
    for i in range(cfg.vlm.depth):
        x, kv = gemma_layer(w, LLM + f"layers.{i}.", x, positions, allowed, heads, hd)
        caches.append(kv)
    # Suffix rows: prefix columns = valid prefix tokens; suffix columns by block (ar) index.
    ar = ([1] if not pi05 else []) + [1] + [0] * (horizon - 1)
    block = np.cumsum(ar)
    allowed = torch.tensor([valid + [bool(block[j] <= block[i]) for j in range(len(ar))] for i in range(len(ar))])
    positions = torch.arange(len(ar)) + sum(valid)

    dt, t, x_t = np.float32(-1 / cfg.num_steps), np.float32(1.0), noise.clone()
    while t >= -dt / 2:
        period = 4e-3 * (4.0 / 4e-3) ** np.linspace(0, 1, cfg.expert.width // 2)
        temb = torch.tensor(np.concatenate([np.sin(2 * np.pi / period * t), np.cos(2 * np.pi / period * t)]),
                            dtype=torch.float32)
        act = linear(w, "action_in_proj", x_t)
        if pi05:
            cond = F.silu(linear(w, "time_mlp_out", F.silu(linear(w, "time_mlp_in", temb))))
            h = act
        else:
            cond = None
            mixed = linear(w, "action_time_mlp_out", F.silu(linear(w, "action_time_mlp_in",
                                                                     torch.cat([act, temb.expand_as(act)], -1))))
            h = torch.cat([linear(w, "state_proj", state)[None], mixed])
        for i in range(cfg.expert.depth):
            h, _ = gemma_layer(w, EXP + f"layers.{i}.", h, positions, allowed, heads, hd, caches[i], cond)
        if pi05:
            scale, shift, _ = linear(w, EXP + "norm.dense", cond).chunk(3, -1)
            h = rms(h) * (1 + scale) + shift
        else:
            h = rms(h, w[EXP + "norm.weight"])
        x_t = x_t + dt * linear(w, "action_out_proj", h[-horizon:])
        t = np.float32(t + dt)
    return x_t


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_model_matches_rederivation(tiny_checkpoint, variant):
    path = tiny_checkpoint(variant)
    cfg = read_checkpoint(path).config
    weights = load_state_dict(path, cfg)
    gen = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8, generator=gen)
    image_mask = torch.tensor([True, False, True])            # a missing middle camera
    tokens = torch.randint(0, 512, (cfg.max_token_len,), generator=gen)
    token_mask = torch.arange(cfg.max_token_len) < 9           # a padded prompt
    state = torch.randn(cfg.state_dim, generator=gen)
    noise = torch.randn(cfg.action_horizon, cfg.action_dim, generator=gen)

    ours = PiModel.from_state_dict(cfg, weights).sample_actions(images, image_mask, tokens, token_mask, state, noise)
    with torch.no_grad():
        ref = rederived_sample(weights, cfg, images, image_mask, tokens, token_mask, state, noise)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert (ours - noise).abs().mean() > 0.1  # the velocity field did move the sample
