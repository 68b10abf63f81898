"""load_policy / Policy.predict end to end on tiny synthetic checkpoints: spec, determinism,
layouts, save/load round trip, normalization around the backend, bad input."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine_checkpoints import camera_images, tiny_checkpoint  # noqa: F401
from flashrt_core import load_policy
from flashrt_core.checkpoint import load_state_dict, read_checkpoint
from flashrt_core.errors import (CheckpointError, DeviceError, FlashRTError, ImageError, InputError, PromptError,
                                 StateError)
from flashrt_core.images import resize_with_pad
from flashrt_core.models.pi0 import PiModel

STATE = np.array([0.1, -0.4, 0.3, 1.2, -0.8, 0.05, 0.6, -1.5])
PROMPT = "pick up the red block"


@pytest.fixture(scope="module")
def pi05(tiny_checkpoint):
    return load_policy(tiny_checkpoint("pi05"), num_views=2)


def predict(policy, seed=0, **overrides):
    args = {"images": camera_images(policy.spec.num_views), "state": STATE, "prompt": PROMPT, "seed": seed}
    return policy.predict(**{**args, **overrides})


def test_spec(tiny_checkpoint, pi05):
    spec = pi05.spec
    assert (spec.model, spec.num_views, spec.image_size, spec.state_dim, spec.action_dim) == \
        ("pi05", 2, (224, 224), 8, 7)
    assert (spec.action_horizon, spec.num_steps, spec.max_prompt_tokens) == (10, 10, 64)
    assert (spec.device, spec.precision, spec.backend) == ("cpu", "fp32", "reference")
    # openpi checkpoints carry no camera list: openpi's three views by default.
    assert load_policy(tiny_checkpoint("pi0")).spec.num_views == 3
    assert load_policy(tiny_checkpoint("pi0", layout="lerobot"), num_steps=4).spec.num_steps == 4


def test_prediction_shape_timing_and_determinism(pi05):
    result = predict(pi05)
    assert result.actions.shape == (10, 7) and result.actions.dtype == np.float32
    assert np.isfinite(result.actions).all()
    assert set(result.timing) == {"preprocess", "model", "postprocess", "total"}
    assert result.prompt_tokens > 10 and not result.truncated
    assert np.array_equal(predict(pi05).actions, result.actions)
    assert not np.allclose(predict(pi05, seed=1).actions, result.actions)
    assert not np.allclose(predict(pi05, seed=None).actions, predict(pi05, seed=None).actions)


def test_output_is_the_unnormalized_backend_output(pi05):
    """predict == quantile-unnormalize(sample_actions(...)) on the real dims, with the noise of the seed."""
    noise = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))
    result = predict(pi05, seed=None, noise=noise.numpy())
    assert np.array_equal(result.actions, predict(pi05, seed=3).actions)
    stats = pi05.norm.actions.stats
    q01, q99 = stats["q01"], stats["q99"]
    norm_state = (STATE - pi05.norm.state.stats["q01"]) / (pi05.norm.state.stats["q99"] -
                                                           pi05.norm.state.stats["q01"] + 1e-6) * 2 - 1
    tokens = pi05.tokenizer.tokenize(PROMPT, norm_state)
    raw = pi05._backend.sample_actions(
        torch.from_numpy(np.stack(camera_images(2))), torch.tensor([True, True]), torch.from_numpy(tokens.tokens),
        torch.from_numpy(tokens.mask), torch.from_numpy(np.pad(norm_state, (0, 24)).astype(np.float32)), noise)
    expected = (raw.numpy()[:, :7].astype(np.float64) + 1) / 2 * (q99 - q01 + 1e-6) + q01
    np.testing.assert_allclose(result.actions, expected, rtol=1e-6, atol=1e-6)


def test_pi0_state_reaches_the_model_and_pi05_state_the_prompt(tiny_checkpoint, pi05):
    pi0 = load_policy(tiny_checkpoint("pi0"), num_views=2)
    for policy in (pi0, pi05):
        assert not np.allclose(predict(policy).actions, predict(policy, state=STATE + 0.5).actions)
        assert not np.allclose(predict(policy).actions, predict(policy, prompt="open the drawer").actions)
    # Pi0.5 sees the state only through its bins: a change inside one bin changes nothing.
    assert np.array_equal(predict(pi05).actions, predict(pi05, state=STATE + 1e-9).actions)


@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_same_prediction_in_every_layout(tiny_checkpoint, model):
    """openpi keys vs LeRobot `model.` keys, tied vs untied embedding, one file vs shards."""
    reference = predict(load_policy(tiny_checkpoint(model), num_views=2)).actions
    for options in ({"layout": "lerobot", "norm_format": "openpi"}, {"tied_embedding": False},
                    {"max_shard_bytes": 30_000}):
        policy = load_policy(tiny_checkpoint(model, **options), num_views=2)
        assert np.array_equal(predict(policy).actions, reference), options


def test_lerobot_norm_stats_give_nearly_the_same_actions(tiny_checkpoint, pi05):
    """LeRobot's processor files hold the same stats, applied with LeRobot's eps and fp32 math."""
    lerobot = load_policy(tiny_checkpoint("pi05", layout="lerobot"))
    assert lerobot.norm.actions.convention == "lerobot" and lerobot.spec.num_views == 2
    np.testing.assert_allclose(predict(lerobot).actions, predict(pi05).actions, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip(tiny_checkpoint, tmp_path, pi05):
    source = tiny_checkpoint("pi05")
    weights = load_state_dict(source, read_checkpoint(source).config)
    copy = tmp_path / "resaved"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    save_file({"model." + k: v.contiguous() for k, v in weights.items()}, str(copy / "model.safetensors"))
    assert np.array_equal(predict(load_policy(copy, num_views=2)).actions, predict(pi05).actions)


def test_missing_view_is_masked_out(tiny_checkpoint):
    """A masked view's pixels do not matter, and it acts like a camera that is not there."""
    path = tiny_checkpoint("pi0")
    cfg = read_checkpoint(path).config
    model = PiModel.from_state_dict(cfg, load_state_dict(path, cfg))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8, generator=gen)
    rest = (torch.randint(0, 512, (48,), generator=gen), torch.arange(48) < 7, torch.randn(32, generator=gen),
            torch.randn(10, 32, generator=gen))
    masked = model.sample_actions(images, torch.tensor([True, True, False]), *rest)
    other = images.clone()
    other[2] = 255 - other[2]
    assert torch.equal(model.sample_actions(other, torch.tensor([True, True, False]), *rest), masked)
    two_views = model.sample_actions(images[:2], torch.tensor([True, True]), *rest)
    torch.testing.assert_close(two_views, masked, rtol=1e-5, atol=1e-5)

    policy = load_policy(path, num_views=3)
    images = camera_images(3)
    with_none = predict(policy, images=[images[0], images[1], None]).actions
    np.testing.assert_allclose(with_none, predict(load_policy(path, num_views=2), images=images[:2]).actions,
                               rtol=1e-4, atol=1e-5)


def test_non_224_images_are_resized_with_pad(pi05):
    big = [np.random.default_rng(i).integers(0, 256, (480, 640, 3), dtype=np.uint8) for i in range(2)]
    resized = [resize_with_pad(image, 224, 224) for image in big]
    assert np.array_equal(predict(pi05, images=big).actions, predict(pi05, images=resized).actions)


def test_long_prompt_is_truncated_with_a_warning(pi05, caplog):
    with caplog.at_level(logging.WARNING):
        result = predict(pi05, prompt="pick up the red block and then " * 20)
    assert result.truncated and result.prompt_tokens == 64 and "truncated" in caplog.text
    assert np.isfinite(result.actions).all()


def test_empty_prompt_runs(pi05):
    assert predict(pi05, prompt="").actions.shape == (10, 7)


@pytest.mark.parametrize("overrides,error,match", [
    ({"images": camera_images(3)}, ImageError, "expected 2 images"),
    ({"images": [np.zeros((224, 224, 3), np.float32)] * 2}, ImageError, "uint8"),
    ({"images": [np.zeros((224, 224, 1), np.uint8)] * 2}, ImageError, "H x W x 3"),
    ({"state": STATE[:7]}, StateError, r"shape \(8,\)"),
    ({"state": np.append(STATE[:7], np.nan)}, StateError, "non-finite values at \\[7\\]"),
    ({"state": ["a"] * 8}, StateError, "numeric"),
    ({"prompt": None}, PromptError, "str"),
    ({"noise": np.zeros((10, 7))}, InputError, "noise must have shape"),
])
def test_bad_input(pi05, overrides, error, match):
    with pytest.raises(error, match=match):
        predict(pi05, **overrides)
    assert predict(pi05).actions.shape == (10, 7)  # still usable afterwards


def test_load_errors_and_close(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_policy(tmp_path / "missing")
    with pytest.raises(DeviceError, match="fp8 needs a GPU"):
        load_policy(tiny_checkpoint("pi0"), precision="fp8")
    with pytest.raises(DeviceError):
        load_policy(tiny_checkpoint("pi0"), backend="warp")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA"):
            load_policy(tiny_checkpoint("pi0"), device="cuda")
    stripped = tmp_path / "no_stats"
    shutil.copytree(tiny_checkpoint("pi0"), stripped, ignore=shutil.ignore_patterns("assets"))
    with pytest.raises(CheckpointError, match="no norm stats"):
        load_policy(stripped)
    config = json.loads((stripped / "config.json").read_text())
    policy = load_policy(tiny_checkpoint("pi0"), num_views=2)
    policy.close()
    with pytest.raises(FlashRTError, match="closed"):
        predict(policy)
    assert config["action_horizon"] == 10


def test_bf16_reference_runs(tiny_checkpoint):
    policy = load_policy(tiny_checkpoint("pi05"), num_views=2, precision="bf16")
    fp32 = load_policy(tiny_checkpoint("pi05"), num_views=2)
    assert policy._backend.vlm.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert policy._backend.vision.post_layernorm.weight.dtype == torch.float32
    assert policy._backend.expert.layers[0].input_layernorm.dense.weight.dtype == torch.float32
    a, b = predict(policy).actions, predict(fp32).actions
    cosine = (a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)
    assert cosine > 0.99


def test_backend_and_precision_follow_the_gpu_generation():
    """The graph runtime needs Ampere+ (else the reference, with a warning); FP8 needs 8.9+;
    'auto' precision is bf16 only where bf16 tensor cores exist."""
    import torch

    from flashrt_core.errors import DeviceError
    from flashrt_core.policy import resolve_precision, select_backend

    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda, (9, 0)) == "bf16"
    assert resolve_precision("auto", cuda, (7, 5)) == "fp32"
    assert resolve_precision("auto", torch.device("cpu"), None) == "fp32"
    assert resolve_precision("fp8", cuda, (8, 9)) == "fp8"
    with pytest.raises(DeviceError, match="8.9"):
        resolve_precision("fp8", cuda, (8, 6))
    with pytest.raises(DeviceError, match="CPU"):
        resolve_precision("fp8", torch.device("cpu"), None)
    assert select_backend("auto", cuda, "fp32", (7, 5)) == "reference"
    assert select_backend("auto", torch.device("cpu"), "fp32", None) == "reference"


@pytest.mark.parametrize("kernels_built", [True, False])
def test_graph_backend_on_a_gpu_needs_the_kernels_for_it(monkeypatch, caplog, kernels_built):
    """Without kernels for the GPU (not built, or built for other archs) 'auto' falls back
    to the reference with a warning naming why, and an explicit 'graph' is refused: the
    captured graphs are made of the kernels."""
    import torch

    from flashrt_core import kernels
    from flashrt_core.errors import DeviceError
    from flashrt_core.policy import select_backend

    monkeypatch.setattr(kernels, "supports_capability", lambda capability: kernels_built)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "flashrt_core._kernels is not importable")
    cuda = torch.device("cuda")
    with caplog.at_level("WARNING"):
        assert select_backend("auto", cuda, "bf16", (9, 0)) == ("graph" if kernels_built else "reference")
    if kernels_built:
        assert select_backend("graph", cuda, "bf16", (9, 0)) == "graph"
        assert not caplog.records
    else:
        assert "needs the CUDA kernels (flashrt_core._kernels is not importable" in caplog.text
        with pytest.raises(DeviceError, match="needs the CUDA kernels"):
            select_backend("graph", cuda, "bf16", (9, 0))
    assert select_backend("graph", torch.device("cpu"), "fp32", None) == "graph"
