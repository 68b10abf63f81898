"""Gemma blocks vs transformers' GemmaModel / GemmaDecoderLayer (tiny config, same weights, fp32),
plus the Pi-specific parts transformers has no twin for (adaRMS, the read-only KV prefix)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashrt_core.models.gemma import (  # noqa: E402
    MASKED_LOGIT, AdaRMSNorm, GemmaConfig, GemmaDecoder, RMSNorm, attention_bias, rope_tables)
from flashrt_core.models.pi0 import make_attn_mask  # noqa: E402

CFG = GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16, vocab_size=96)


def hf_model():
    cfg = transformers.GemmaConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.width, intermediate_size=CFG.mlp_dim,
        num_hidden_layers=CFG.depth, num_attention_heads=CFG.num_heads, num_key_value_heads=CFG.num_kv_heads,
        head_dim=CFG.head_dim, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, attn_implementation="eager")
    model = transformers.GemmaModel(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # norms random too, so the (1 + w) form matters
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ours = GemmaDecoder(CFG, with_embedding=True).eval()
    ours.load_state_dict(model.state_dict())
    return model, ours


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def prefix_lm_case(n=9, pad_at=(3, 8)):
    """A prefix-LM mask (first 5 tokens bidirectional, then causal) with two invalid tokens."""
    pad = torch.ones(1, n, dtype=torch.bool)
    pad[0, list(pad_at)] = False
    ar = torch.tensor([0] * 5 + [1] * (n - 5))
    positions = torch.cumsum(pad, dim=1) - 1
    return make_attn_mask(pad, ar), positions


def additive(mask):
    return torch.where(mask, 0.0, MASKED_LOGIT)[:, None]


def test_embedding_is_scaled_and_the_decoder_applies_no_normalizer():
    hf, ours = hf_model()
    ids = torch.tensor([[2, 17, 40, 95, 1]])
    scaled = hf.embed_tokens.weight[ids] * CFG.width**0.5
    with torch.no_grad():
        assert torch.equal(ours.embed(ids), hf.embed_tokens(ids))
        assert rel_err(ours.embed(ids), scaled) < 1e-6
        # GemmaModel given inputs_embeds uses them as they are: no second sqrt(width).
        from_ids = hf(input_ids=ids).last_hidden_state
        from_embeds = hf(inputs_embeds=ours.embed(ids)).last_hidden_state
    assert torch.equal(from_ids, from_embeds)


def test_decoder_layer_matches_transformers():
    hf, ours = hf_model()
    mask, positions = prefix_lm_case()
    x = torch.randn(1, 9, CFG.width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.layers[0](x, attention_mask=additive(mask), position_ids=positions,
                           position_embeddings=hf.rotary_emb(x, positions))
        out, _ = ours.layers[0](x, rope_tables(positions, CFG.head_dim), attention_bias(mask, x.dtype))
    assert rel_err(out[pad_rows(mask)], ref[pad_rows(mask)]) < 1e-5
    assert rel_err(out, ref) < 1e-5  # fully masked rows agree too (uniform attention, finite)


def pad_rows(mask):
    return mask.any(-1)


def test_decoder_stack_matches_transformers():
    hf, ours = hf_model()
    mask, positions = prefix_lm_case()
    x = torch.randn(1, 9, CFG.width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(inputs_embeds=x, attention_mask=additive(mask), position_ids=positions).last_hidden_state
        out, _ = ours(x, rope_tables(positions, CFG.head_dim), mask)
    assert rel_err(out, ref) < 1e-5


def test_kv_prefix_pass_equals_one_joint_pass():
    """Suffix queries reading the cached prefix K/V == one transformers pass over prefix+suffix
    with the suffix rows of the same mask (what openpi's cache + mask concatenation computes)."""
    hf, ours = hf_model()
    prefix_pad = torch.tensor([[True, True, False, True, True, True]])
    suffix_ar = torch.tensor([1, 1, 0, 0])
    pad = torch.cat([prefix_pad, torch.ones(1, 4, dtype=torch.bool)], dim=1)
    ar = torch.cat([torch.zeros(6, dtype=torch.int64), suffix_ar])
    mask, positions = make_attn_mask(pad, ar), torch.cumsum(pad, dim=1) - 1
    x = torch.randn(1, 10, CFG.width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(inputs_embeds=x, attention_mask=additive(mask), position_ids=positions).last_hidden_state[:, 6:]
        _, kv = ours(x[:, :6], rope_tables(positions[:, :6], CFG.head_dim), mask[:, :6, :6])
        kv_before = [(k.clone(), v.clone()) for k, v in kv]
        out, _ = ours(x[:, 6:], rope_tables(positions[:, 6:], CFG.head_dim), mask[:, 6:, :], kv_prefix=kv)
    assert rel_err(out, ref) < 1e-5
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(kv, kv_before))


def test_rms_norm_is_one_plus_w_in_fp32():
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, 8))
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    xf = x.float()
    expected = xf / torch.sqrt(xf.square().mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight)
    y, gate = norm(x)
    assert gate is None and y.dtype == torch.bfloat16
    assert torch.equal(y, expected.to(torch.bfloat16))


def test_adarms_modulates_scale_shift_and_gate():
    width, cond_dim = 8, 6
    norm = AdaRMSNorm(width, cond_dim)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        norm.dense.weight.copy_(torch.randn(3 * width, cond_dim, generator=gen))
        norm.dense.bias.copy_(torch.randn(3 * width, generator=gen))
    x = torch.randn(2, 3, width, generator=gen)
    cond = torch.randn(2, cond_dim, generator=gen)
    mod = cond @ norm.dense.weight.T + norm.dense.bias
    scale, shift, gate = mod[:, None, :width], mod[:, None, width:2 * width], mod[:, None, 2 * width:]
    rms = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    y, g = norm(x, cond)
    assert rel_err(y, rms * (1 + scale) + shift) < 1e-6
    assert rel_err(g, gate.expand_as(g)) < 1e-6
