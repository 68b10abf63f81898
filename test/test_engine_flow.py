"""Flow-matching sampler: the t schedule, the Euler update, the time embedding, determinism."""

import numpy as np
import torch

from flashrt_core.models.pi0 import PiModel, flow_times, time_embedding
from flashrt_core.synthetic import synthetic_config


def test_schedule_is_one_to_dt_accumulated_in_fp32():
    times = flow_times(10)
    np.testing.assert_allclose(times, np.arange(10, 0, -1) / 10, atol=1e-6)
    t, expected = np.float32(1.0), []
    for _ in range(10):
        expected.append(float(t))
        t = np.float32(t + np.float32(-0.1))
    assert times == expected  # 1.0, 0.9, 0.79999995, ... as openpi's fp32 loop visits them
    assert all(len(flow_times(n)) == n for n in range(1, 64))


def test_time_embedding_formula():
    t = float(np.float32(0.7))
    emb = time_embedding(t, 16)
    period = 4e-3 * (4.0 / 4e-3) ** np.linspace(0.0, 1.0, 8)
    angle = 2 * np.pi / period * t
    assert emb.dtype == torch.float32 and emb.shape == (1, 16)
    np.testing.assert_array_equal(emb[0].numpy(), np.concatenate([np.sin(angle), np.cos(angle)]).astype(np.float32))


def tiny_model(variant, seed=0):
    torch.manual_seed(seed)
    return PiModel(synthetic_config(variant, "tiny")).eval()


def inputs(config, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 512, (config.max_token_len,), generator=gen)
    return (torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=gen), torch.tensor([True, True]),
            tokens, torch.arange(config.max_token_len) < 12, torch.randn(config.state_dim, generator=gen),
            torch.randn(config.action_horizon, config.action_dim, generator=gen))


def test_euler_steps_visit_the_schedule(monkeypatch):
    model = tiny_model("pi05")
    visited = []

    def constant_velocity(x_t, t, *args):
        visited.append(t)
        return torch.full_like(x_t, 0.5)

    monkeypatch.setattr(model, "velocity", constant_velocity)
    args = inputs(model.config)
    out = model.sample_actions(*args)
    assert visited == flow_times(10)
    expected = args[-1].clone()
    for _ in range(10):
        expected = expected + np.float32(-0.1) * torch.full_like(expected, 0.5)
    assert torch.equal(out, expected)


def test_sampling_is_deterministic_and_depends_on_noise():
    for variant in ("pi0", "pi05"):
        model = tiny_model(variant)
        args = inputs(model.config)
        first, second = model.sample_actions(*args), model.sample_actions(*args)
        assert torch.equal(first, second)
        other_noise = model.sample_actions(*args[:-1], torch.randn_like(args[-1]))
        assert not torch.allclose(first, other_noise)
        assert torch.isfinite(first).all() and first.shape == (10, 32)
