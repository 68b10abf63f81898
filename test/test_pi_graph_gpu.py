"""The graph runtime on the GPU at full size (random weights): precision gates against the
fp32 reference on the same noise, graph replay vs the same forward run eagerly, prompt
buckets staying on the graph path, determinism. Timing lives in bench/pi_runtime.py."""

from dataclasses import replace

import pytest
import torch

from flashrt_core import synthetic
from flashrt_core.models.pi0 import PiConfig, PiModel
from flashrt_core.ops import expert as expert_ops
from flashrt_core.runtime.pi0_graph import PiGraphRuntime

pytestmark = pytest.mark.gpu

COSINE_GATE = {"bf16": 0.999, "fp8": 0.995}


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


@pytest.fixture(scope="module", params=["pi05", "pi0"])
def full_model(request):
    config = replace(PiConfig(variant=request.param), action_horizon=10)
    weights = synthetic.random_state_dict(config, seed=0, device="cuda", dtype=torch.bfloat16)
    reference = PiModel.from_state_dict(config, weights, device="cuda", dtype=torch.float32)
    yield config, weights, reference
    del reference, weights
    torch.cuda.empty_cache()


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_fast_path_matches_fp32_reference(full_model, precision):
    config, weights, reference = full_model
    fast = PiGraphRuntime.from_state_dict(config, weights, device="cuda", precision=precision)
    if precision == "fp8":  # static scales from other observations than the ones checked
        fast.calibrate([synthetic.random_observation(config, 2, 30, seed=100 + i) for i in range(4)])
    for view_mask, prompt_tokens in (((True, True), 20), ((True, False, True), 45)):
        obs = synthetic.random_observation(config, len(view_mask), prompt_tokens, seed=prompt_tokens,
                                           view_mask=view_mask)
        expected = reference.sample_actions(*obs).cpu()
        actual = fast.sample_actions(*obs)
        assert torch.isfinite(actual).all()
        assert cosine(actual, expected) >= COSINE_GATE[precision], (view_mask, prompt_tokens)


@pytest.mark.parametrize("expert_attention", [True, False])
def test_gemm_expert_path_matches_fp32_reference(full_model, monkeypatch, expert_attention):
    """The expert on cuBLAS + elementwise kernels (the path of horizons over 16 rows, e.g.
    Pi0's 50), attending through the expert's attention kernel (where it runs) or the
    generic decode_attention (elsewhere): there Pi0's state pass and action pass run on
    different token counts, each with its own workspace."""
    config, weights, reference = full_model
    if not expert_attention:
        monkeypatch.setattr(expert_ops, "attention_runs_on_kernel", lambda *args: False)
    fast = PiGraphRuntime.from_state_dict(config, weights, device="cuda", precision="bf16", expert_path="gemm")
    assert fast.w.expert_attention_kernel == expert_attention
    for prompt_tokens in (20, 45):
        obs = synthetic.random_observation(config, 2, prompt_tokens, seed=prompt_tokens)
        for _ in range(2):  # a second call reuses every workspace
            assert cosine(fast.sample_actions(*obs), reference.sample_actions(*obs).cpu()) >= COSINE_GATE["bf16"]


def test_replay_equals_eager_run_and_is_deterministic(full_model):
    config, weights, _ = full_model
    fast = PiGraphRuntime.from_state_dict(config, weights, device="cuda", precision="bf16")
    obs = synthetic.random_observation(config, 2, 30, seed=1)
    first = fast.sample_actions(*obs)
    second = fast.sample_actions(*obs)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # same inputs, same bits
    session = fast._session(2)
    assert list(session.graphs) == [fast._bucket(30)]
    with torch.inference_mode():
        session.x_t.fill_(float("nan"))  # poison: the forward must overwrite it
        fast._forward(session, fast._bucket(30))  # the same forward, eagerly
    torch.testing.assert_close(session.x_t.cpu(), first, rtol=2e-2, atol=2e-2)


def test_new_prompt_length_stays_on_graph_path(full_model):
    config, weights, reference = full_model
    fast = PiGraphRuntime.from_state_dict(config, weights, device="cuda", precision="bf16")
    fast.prepare(2)
    buckets = set(fast._session(2).graphs)
    assert buckets == set(fast.buckets) == set(fast._session(1).graphs)  # a missing camera is ready too
    for prompt_tokens in (3, 17, config.max_token_len):
        obs = synthetic.random_observation(config, 2, prompt_tokens, seed=prompt_tokens)
        actual = fast.sample_actions(*obs)
        assert set(fast._session(2).graphs) == buckets  # nothing captured on the hot path
        assert cosine(actual, reference.sample_actions(*obs).cpu()) >= COSINE_GATE["bf16"]
    missing = synthetic.random_observation(config, 2, 20, seed=3, view_mask=(False, True))
    assert cosine(fast.sample_actions(*missing), reference.sample_actions(*missing).cpu()) >= COSINE_GATE["bf16"]
    assert set(fast._session(1).graphs) == buckets


def test_fp8_calibration_round_trips(full_model):
    """A cached calibration (the amax dict) reproduces the calibrated model exactly."""
    config, weights, _ = full_model
    first = PiGraphRuntime.from_state_dict(config, weights, device="cuda", precision="fp8")
    amax = first.calibrate([synthetic.random_observation(config, 2, 30, seed=5)])
    assert all(v > 0 for v in amax.values())
    second = PiGraphRuntime.from_state_dict(config, weights, device="cuda", precision="fp8")
    assert second.calibrate(amax=amax) == amax
    obs = synthetic.random_observation(config, 2, 30, seed=6)
    torch.testing.assert_close(first.sample_actions(*obs), second.sample_actions(*obs), rtol=0, atol=0)


def test_vision_fast_paths_match_the_plain_ops(full_model):
    """SigLIP on CUDA: flash-attention varlen straight from the packed QKV and fc1 with
    cuBLASLt's GELU epilogue give the image tokens of SDPA + a separate gelu_tanh."""
    config, weights, _ = full_model
    fast = PiGraphRuntime.from_state_dict(config, weights, device="cuda", precision="bf16")
    s = fast._session(2)
    assert s.flash_varlen and s.fused_gelu  # torch 2.11+ on SM80+: both should be there
    obs = synthetic.random_observation(config, 2, 20, seed=5)
    fast._stage(*obs)
    with torch.inference_mode():
        fast._vision(s)
        tokens = s.g_res[:s.image_tokens].clone()
        s.flash_varlen = s.fused_gelu = False
        s.g_res.fill_(float("nan"))
        fast._vision(s)
    plain = s.g_res[:s.image_tokens].float()
    assert torch.isfinite(tokens).all()
    assert cosine(tokens, plain) > 0.9999
    assert (tokens.float() - plain).norm() / plain.norm() < 2e-2


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_expert_the_kernels_do_not_take_runs_on_the_gemm_path(precision):
    """A tiny expert (head_dim 16, width 32): the small-M kernels do not take it, and their
    twins read the KV-cache offset on the host, which a graph capture forbids. So "auto"
    picks the GEMM path, whose graph captures and matches the reference, and asking for
    the small-M path is refused with the reason."""
    config = synthetic.synthetic_config("pi05", "tiny")
    weights = synthetic.random_state_dict(config, seed=4, device="cuda", dtype=torch.bfloat16)
    reference = PiModel.from_state_dict(config, weights, device="cuda", dtype=torch.float32)
    fast = PiGraphRuntime.from_state_dict(config, weights, device="cuda", precision=precision)
    assert not fast.w.fused_expert
    obs = synthetic.random_observation(config, 2, 9, seed=5)
    if precision == "fp8":
        fast.calibrate([obs])
    fast.prepare(2)
    assert cosine(fast.sample_actions(*obs), reference.sample_actions(*obs).cpu()) >= COSINE_GATE[precision]
    with pytest.raises(ValueError, match="do not take this expert"):
        PiGraphRuntime.from_state_dict(config, weights, device="cuda", precision="bf16", expert_path="small_m")
