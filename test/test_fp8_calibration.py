"""Where a Policy's FP8 activation scales come from (`calibration_source`), and
calibration as all or nothing: a calibration that fails part-way puts the scales in use
before it back. On the CPU through the graph runtime's CPU FP8 path (engine_checkpoints
cpu_fp8); the same tests on a GPU (marked gpu) also check that recalibrating moves the
scales the already captured graphs read."""

import contextlib

import numpy as np
import pytest
from engine_checkpoints import camera_images, cpu_fp8, tiny_checkpoint  # noqa: F401 - fixtures

from flashrt_core import load_policy

NUM_VIEWS = 2
PROMPT = "pick up the red block"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def fp8_policy(request, tiny_checkpoint, monkeypatch, tmp_path):  # noqa: F811
    """fp8_policy() loads the tiny Pi0.5 in fp8 (calibration caches in tmp_path)."""
    if request.param == "cpu":
        request.getfixturevalue("cpu_fp8")
    else:
        monkeypatch.setenv("FLASHRT_CACHE_DIR", str(tmp_path))
    checkpoint = tiny_checkpoint("pi05")
    loaded = []

    def load():
        loaded.append(load_policy(checkpoint, device=request.param, precision="fp8", num_views=NUM_VIEWS))
        return loaded[-1]

    yield load
    for policy in loaded:
        policy.close()


def blank_observation(policy) -> dict:
    """What the node's configure warms up on."""
    height, width = policy.spec.image_size
    return {"images": [np.zeros((height, width, 3), np.uint8)] * NUM_VIEWS,
            "state": np.zeros(policy.spec.state_dim), "prompt": "warm up"}


def camera_observation(policy, seed=0) -> dict:
    state = np.random.default_rng(seed).uniform(-1, 1, policy.spec.state_dim)
    return {"images": camera_images(NUM_VIEWS, seed), "state": state, "prompt": PROMPT}


def scales(policy) -> dict[str, float]:
    """The activation range of every FP8 GEMM input (its static scale is this / 448)."""
    return policy._backend.calibration()


def act_scales(policy) -> dict[str, float]:
    """The static scales themselves: the device tensors the FP8 GEMMs (and graphs) read."""
    return {lin.name: float(lin.act_scale) for _, _, lin in policy._backend._fp8_targets()}


def predict(policy, observation):
    return policy.predict(**observation, seed=0).actions


def test_not_fp8_has_no_calibration_source(tiny_checkpoint):  # noqa: F811
    policy = load_policy(tiny_checkpoint("pi05"), device="cpu", precision="fp32", num_views=NUM_VIEWS)
    try:
        predict(policy, camera_observation(policy))
        assert policy.calibration_source is None and policy.calibration_file is None
    finally:
        policy.close()


def test_calibration_source_follows_where_the_scales_come_from(fp8_policy):
    policy = fp8_policy()
    assert policy.calibration_source is None and policy.needs_calibration
    assert not policy.calibration_file.exists()

    predict(policy, blank_observation(policy))  # calibrates on that one observation
    assert policy.calibration_source == "provisional"
    assert not policy.calibration_file.exists()  # a blank frame's scales are not kept
    blank = scales(policy)

    policy.calibrate([camera_observation(policy, seed) for seed in range(2)])
    assert policy.calibration_source == "observations"
    assert policy.calibration_file.exists()
    measured = scales(policy)
    assert all(measured[name] != blank[name] for name in blank)
    measured_actions = predict(policy, camera_observation(policy, seed=5))

    cached = fp8_policy()
    assert cached.calibration_source == "cache" and not cached.needs_calibration
    assert scales(cached) == measured and act_scales(cached) == act_scales(policy)
    # The same scales give the same actions: on a GPU the first policy's graphs, captured
    # before recalibrating, read the moved scales in place.
    np.testing.assert_array_equal(predict(cached, camera_observation(cached, seed=5)), measured_actions)


@contextlib.contextmanager
def failing_forward(policy, call: int):
    """Within: the backend's `call`-th forward raises (the ones before run); yields a list
    that receives the ranges as they were when it raised."""
    backend = policy._backend
    forward, calls, seen = backend._forward, [], []

    def failing(*args):
        calls.append(None)
        if len(calls) == call:
            seen.append(backend.calibration())
            raise RuntimeError("injected forward failure")
        return forward(*args)

    backend._forward = failing
    try:
        yield seen
    finally:
        del backend._forward


def test_failed_calibration_puts_the_previous_scales_back(fp8_policy):
    policy = fp8_policy()
    predict(policy, blank_observation(policy))
    before, before_scales = scales(policy), act_scales(policy)
    before_actions = predict(policy, camera_observation(policy, seed=5))

    with failing_forward(policy, call=2) as partial, pytest.raises(RuntimeError, match="injected"):
        policy.calibrate([camera_observation(policy, seed) for seed in range(3)])
    assert partial and partial[0] != before  # the backend had measured one observation of three

    assert scales(policy) == before and act_scales(policy) == before_scales
    assert policy.calibration_source == "provisional"
    assert not policy.calibration_file.exists()
    np.testing.assert_array_equal(predict(policy, camera_observation(policy, seed=5)), before_actions)


def test_failed_first_calibration_leaves_the_policy_uncalibrated(fp8_policy):
    policy = fp8_policy()
    with failing_forward(policy, call=1), pytest.raises(RuntimeError, match="injected"):
        policy.calibrate([camera_observation(policy)])
    assert policy.needs_calibration and policy.calibration_source is None
    assert not policy.calibration_file.exists()

    actions = predict(policy, camera_observation(policy))  # calibrates provisionally, as before
    assert policy.calibration_source == "provisional" and np.isfinite(actions).all()


def test_bad_observation_fails_before_any_scale_moves(fp8_policy):
    from flashrt_core.errors import StateError

    policy = fp8_policy()
    predict(policy, blank_observation(policy))
    before = scales(policy)
    bad = dict(camera_observation(policy), state=np.zeros(policy.spec.state_dim + 1))
    with pytest.raises(StateError):
        policy.calibrate([camera_observation(policy), bad])
    assert scales(policy) == before and policy.calibration_source == "provisional"


def test_fp8_linear_refuses_the_fused_gelu_epilogue():
    """Fp8Linear would inherit Linear.gelu_tanh and run it on its dequantized fp32 weight;
    it says that epilogue has no FP8 form instead (SigLIP, its one user, stays bf16)."""
    import torch

    from flashrt_core.runtime.precision import Fp8Linear, Linear

    linear = Linear(torch.randn(8, 16, dtype=torch.bfloat16), name="vision.fc1")
    fp8 = Fp8Linear(linear, scratch=torch.empty(64, dtype=torch.float8_e4m3fn))
    with pytest.raises(NotImplementedError, match="vision.fc1: the fused GELU epilogue has no FP8 form"):
        fp8.gelu_tanh(torch.randn(4, 16, dtype=torch.bfloat16), out=torch.empty(4, 8, dtype=torch.bfloat16))
