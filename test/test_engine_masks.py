"""Attention masks and RoPE positions of Pi0 / Pi0.5, against hand-worked small cases."""

import torch

from flashrt_core.models.gemma import GemmaConfig
from flashrt_core.models.pi0 import PiConfig, attention_layout, make_attn_mask, suffix_ar
from flashrt_core.models.siglip import SiglipConfig

T, F = True, False


def config(variant, horizon=3):
    # 28 px images with 14 px patches: 4 tokens per view, small enough to write masks by hand.
    return PiConfig(variant=variant, action_horizon=horizon, max_token_len=3,
                    vision=SiglipConfig(width=8, depth=1, mlp_dim=16, num_heads=2, image_size=28),
                    vlm=GemmaConfig(16, 1, 32, 2, 1, 8, vocab_size=32), expert=GemmaConfig(8, 1, 16, 2, 1, 8))


def matrix(rows):
    return torch.tensor([[c == "1" for c in row.replace(" ", "")] for row in rows])


def test_big_vision_mask_examples():
    pad = torch.ones(1, 6, dtype=torch.bool)
    assert torch.equal(make_attn_mask(pad, torch.tensor([1, 1, 1, 1, 1, 1]))[0], torch.ones(6, 6).tril().bool())
    prefix_lm = make_attn_mask(pad, torch.tensor([0, 0, 0, 1, 1, 1]))[0]
    assert torch.equal(prefix_lm, matrix(["111000", "111000", "111000", "111100", "111110", "111111"]))
    blocks = make_attn_mask(torch.ones(1, 5, dtype=torch.bool), torch.tensor([1, 0, 1, 0, 0]))[0]
    assert torch.equal(blocks, matrix(["11000", "11000", "11111", "11111", "11111"]))
    padded = make_attn_mask(torch.tensor([[T, F, T]]), torch.tensor([0, 0, 0]))[0]
    assert torch.equal(padded, matrix(["101", "000", "101"]))


def test_suffix_ar_flags():
    assert suffix_ar(config("pi0", horizon=4)) == [1, 1, 0, 0, 0]
    assert suffix_ar(config("pi05", horizon=4)) == [1, 0, 0, 0]


def test_pi0_layout_with_a_missing_view_and_a_padded_prompt():
    # views: [valid, missing] x 4 tokens; prompt: 2 tokens + 1 pad; suffix: state + 3 actions.
    layout = attention_layout(config("pi0"), torch.tensor([T, F]), torch.tensor([T, T, F]))
    pad = [T] * 4 + [F] * 4 + [T, T, F]
    assert layout.prefix_pad[0].tolist() == pad
    assert layout.prefix_positions[0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 4, 5, 5]
    valid = torch.tensor(pad)
    assert torch.equal(layout.prefix_mask[0], valid[:, None] & valid[None, :])  # bidirectional over valid
    prefix_cols = "1111 0000 110"
    assert torch.equal(layout.suffix_mask[0], matrix([
        prefix_cols + " 1000",   # state: prefix + itself
        prefix_cols + " 1111",   # actions: prefix + state + every action
        prefix_cols + " 1111",
        prefix_cols + " 1111"]))
    assert layout.suffix_positions[0].tolist() == [6, 7, 8, 9]  # after the 6 valid prefix tokens


def test_pi05_layout():
    layout = attention_layout(config("pi05"), torch.tensor([T, T]), torch.tensor([T, F, F]))
    assert layout.prefix_positions[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8]
    assert torch.equal(layout.suffix_mask[0], matrix(["1111 1111 100 111"] * 3))
    assert layout.suffix_positions[0].tolist() == [9, 10, 11]
