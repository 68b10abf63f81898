"""The fast runtime's forward (static buffers, fused ops, precomputed step terms, prompt
buckets, Pi0 state-token K/V reuse) against the reference PiModel, on the CPU in fp32
through the ops' PyTorch twins. Same function, so the actions must agree to fp32 rounding."""

import pytest
import torch

from flashrt_core import synthetic
from flashrt_core.checkpoint import load_state_dict, read_checkpoint
from flashrt_core.models.pi0 import PiModel
from flashrt_core.ops import expert as expert_ops
from flashrt_core.runtime.pi0_graph import PiGraphRuntime, prompt_buckets


@pytest.fixture(scope="module", params=["pi05", "pi0"])
def backends(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    synthetic.write_checkpoint(request.param, path, size="tiny", seed=3)
    config = read_checkpoint(path).config
    weights = load_state_dict(path, config)
    reference = PiModel.from_state_dict(config, weights)
    fast = PiGraphRuntime.from_state_dict(config, weights, device="cpu", precision="fp32")
    return config, reference, fast


@pytest.mark.parametrize("view_mask", [(True, True), (False, True), (True, False, True)])
def test_fast_forward_matches_reference(backends, view_mask):
    config, reference, fast = backends
    for valid_tokens in (1, 16, 17, config.max_token_len):  # bucket edges and the full budget
        obs = synthetic.random_observation(config, len(view_mask), valid_tokens, seed=valid_tokens,
                                           view_mask=view_mask)
        expected = reference.sample_actions(*obs)
        actual = fast.sample_actions(*obs)
        assert actual.shape == expected.shape == (config.action_horizon, config.action_dim)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_prompt_padding_beyond_the_bucket_does_not_matter(backends):
    """Tokens right of the valid ones are masked: changing them must not change the actions."""
    config, _, fast = backends
    images, view_mask, tokens, token_mask, state, noise = synthetic.random_observation(config, 2, 5, seed=7)
    first = fast.sample_actions(images, view_mask, tokens, token_mask, state, noise)
    tokens[5:] = 3
    second = fast.sample_actions(images, view_mask, tokens, token_mask, state, noise)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_buckets_cover_the_budget():
    assert prompt_buckets(48) == (16, 32, 48)
    assert prompt_buckets(200) == (16, 32, 48, 64, 96, 128, 192, 200)
    assert prompt_buckets(10) == (10,)


def test_small_m_expert_path_matches_gemm_path(backends):
    """The fused small-M expert (packed weights, norm prologues, RoPE / GeGLU / gated-residual
    epilogues) computes what the GEMM path does; on the CPU both run in bf16 through twins."""
    config, reference, _ = backends
    weights = {PiModel.checkpoint_name(k): v for k, v in reference.state_dict().items()}
    paths = {path: PiGraphRuntime.from_state_dict(config, weights, device="cpu", precision="bf16", expert_path=path)
             for path in ("small_m", "gemm")}
    assert paths["small_m"].w.fused_expert and not paths["gemm"].w.fused_expert
    obs = synthetic.random_observation(config, 2, 11, seed=21, view_mask=(True, False))
    small_m, gemm = (paths[p].sample_actions(*obs) for p in ("small_m", "gemm"))
    expected = reference.sample_actions(*obs)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(small_m.flatten(), gemm.flatten(), 0) > 0.999
    assert cosine(small_m.flatten(), expected.flatten(), 0) > 0.999


def test_gemm_expert_path_attends_with_the_expert_kernel_op(backends, monkeypatch):
    """Where the expert's attention kernel runs (bf16, head_dim 256 on the GPU), the cuBLAS
    expert path attends through it instead of the generic decode_attention. Forced here on
    the CPU, where the op runs its twin: same actions as the generic op (keys, bias, rows
    and Pi0's separate state pass wired alike)."""
    config, reference, _ = backends
    weights = {PiModel.checkpoint_name(k): v for k, v in reference.state_dict().items()}
    obs = synthetic.random_observation(config, 2, 11, seed=5, view_mask=(True, False))
    generic = PiGraphRuntime.from_state_dict(config, weights, device="cpu", precision="bf16", expert_path="gemm")
    monkeypatch.setattr(expert_ops, "attention_runs_on_kernel", lambda *args: True)
    expert = PiGraphRuntime.from_state_dict(config, weights, device="cpu", precision="bf16", expert_path="gemm")
    assert expert.w.expert_attention_kernel and not generic.w.expert_attention_kernel
    assert expert._session(2).attn_workspace == {}
    torch.testing.assert_close(expert.sample_actions(*obs), generic.sample_actions(*obs), rtol=2e-2, atol=2e-2)


def test_fp8_prefix_with_quantizing_producers(backends, monkeypatch):
    """FP8 (E4M3 through torch's CPU _scaled_mm): norms and GeGLU write each prefix GEMM's
    input already quantized with its static scale. Same actions as quantizing in a separate
    pass (up to the one bf16 rounding skipped), close to fp32, and calibration (which
    measures the unquantized inputs) gives the same scales on both paths."""
    config = backends[0]
    weights = synthetic.random_state_dict(config, seed=3)
    calibration = [synthetic.random_observation(config, 2, 12, seed=40 + i) for i in range(2)]
    obs = synthetic.random_observation(config, 2, 20, seed=50)

    def run(separate_quantize: bool):
        if separate_quantize:
            monkeypatch.setattr("flashrt_core.runtime.pi0_graph.gemm_input", lambda linear, buffer: (buffer, None))
        fast = PiGraphRuntime.from_state_dict(config, weights, device="cpu", precision="fp8")
        amax = fast.calibrate(calibration)
        return fast.sample_actions(*obs), amax

    fused, fused_amax = run(separate_quantize=False)
    separate, separate_amax = run(separate_quantize=True)
    assert fused_amax == separate_amax
    assert torch.isfinite(fused).all()
    assert not torch.equal(fused, separate)  # the producers did quantize (one rounding fewer)
    cos = torch.nn.functional.cosine_similarity
    assert cos(fused.flatten().double(), separate.flatten().double(), 0) > 0.9999
    expected = PiModel.from_state_dict(config, weights).sample_actions(*obs)
    assert cos(fused.flatten().double(), expected.flatten().double(), 0) > 0.995
