"""Norm stats: openpi and LeRobot formulas, round trips, padded dims, file formats, asset choice."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flashrt_core.errors import CheckpointError
from flashrt_core.normalization import FeatureNormalizer, load_norm_stats

MEAN, STD = np.array([1.0, -2.0, 0.5]), np.array([0.5, 2.0, 0.0])
Q01, Q99 = np.array([-1.0, 0.0, 3.0]), np.array([1.0, 4.0, 3.0])
STATS = {"mean": MEAN, "std": STD, "q01": Q01, "q99": Q99}


def openpi(mode):
    return FeatureNormalizer(mode, STATS, 3, "openpi", 1e-6)


def lerobot(mode, eps=1e-8):
    stats = {**STATS, "min": Q01 - 1, "max": Q99 + 1}
    return FeatureNormalizer(mode, stats, 3, "lerobot", eps)


X = np.array([2.0, 0.0, 3.0])


def test_openpi_formulas_by_hand():
    np.testing.assert_array_equal(openpi("mean_std").normalize(X), (X - MEAN) / (STD + 1e-6))
    np.testing.assert_allclose(openpi("quantiles").normalize(X),
                               [(2 + 1) / (2 + 1e-6) * 2 - 1, 0 / (4 + 1e-6) * 2 - 1, 0 / 1e-6 * 2 - 1])


def test_lerobot_formulas_by_hand():
    # mean/std: eps only on the way in; a zero quantile range is replaced by eps.
    np.testing.assert_allclose(lerobot("mean_std").normalize(X), (X - MEAN) / (STD + 1e-8), rtol=1e-6)
    np.testing.assert_allclose(lerobot("mean_std").unnormalize(X), X * STD + MEAN, rtol=1e-6)
    np.testing.assert_allclose(lerobot("quantiles", eps=1e-3).normalize(X),
                               [2 * 3 / 2 - 1, 2 * 0 / 4 - 1, 2 * 0 / 1e-3 - 1], rtol=1e-6)
    np.testing.assert_allclose(lerobot("min_max").normalize(X), 2 * (X - (Q01 - 1)) / (Q99 - Q01 + 2) - 1, rtol=1e-6)
    assert lerobot("quantiles").normalize(X).dtype == np.float32
    assert openpi("quantiles").normalize(X).dtype == np.float64


ROUND_TRIP = {"mean": MEAN, "std": np.array([0.5, 2.0, 0.1]), "q01": Q01, "q99": np.array([1.0, 4.0, 3.5]),
              "min": Q01 - 1, "max": Q99 + 1}


@pytest.mark.parametrize("convention,mode", [("openpi", "mean_std"), ("openpi", "quantiles"),
                                             ("lerobot", "mean_std"), ("lerobot", "quantiles"),
                                             ("lerobot", "min_max")])
def test_round_trip_and_padded_dims(convention, mode):
    norm = FeatureNormalizer(mode, ROUND_TRIP, 3, convention, 1e-6 if convention == "openpi" else 1e-8)
    x = np.array([0.3, -1.2, 3.0])
    padded = np.concatenate([norm.normalize(x), [0.25, -0.5]])
    back = norm.unnormalize(padded)
    np.testing.assert_allclose(back[:3], x, rtol=1e-5, atol=1e-5)
    if (convention, mode) == ("openpi", "mean_std"):
        # openpi pads mean with 0 and std with 1, so padded dims are scaled by (1 + 1e-6).
        np.testing.assert_array_equal(back[3:], np.array([0.25, -0.5]) * (1 + 1e-6))
    else:
        np.testing.assert_array_equal(back[3:], np.array([0.25, -0.5], dtype=back.dtype))


def test_lerobot_mean_std_with_zero_std_does_not_round_trip():
    """LeRobot adds eps only when normalizing: a constant dim comes back as its mean."""
    norm = lerobot("mean_std")
    np.testing.assert_allclose(norm.unnormalize(norm.normalize(X))[2], MEAN[2])


def test_identity_and_missing_stats():
    ident = FeatureNormalizer("identity", {}, None, "lerobot", 1e-8)
    np.testing.assert_array_equal(ident.normalize(X), X.astype(np.float32))
    with pytest.raises(CheckpointError, match="q01"):
        FeatureNormalizer("quantiles", {"mean": MEAN, "std": STD}, 3, "openpi")


def write_openpi(directory, asset, stats):
    path = directory / "assets" / asset
    path.mkdir(parents=True)
    (path / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))


def stats_doc(dim, offset=0.0, quantiles=True):
    doc = {"mean": [offset] * dim, "std": [2.0] * dim}
    if quantiles:
        doc |= {"q01": [offset - 1] * dim, "q99": [offset + 1] * dim}
    else:
        doc |= {"q01": None, "q99": None}
    return doc


def test_openpi_asset_selection(tmp_path):
    write_openpi(tmp_path, "droid", {"state": stats_doc(8), "actions": stats_doc(8)})
    only = load_norm_stats(tmp_path, "quantiles")
    assert only.state.dim == 8 and only.state.mode == "quantiles" and "droid" in only.source
    write_openpi(tmp_path, "physical-intelligence/libero", {"state": stats_doc(8, 5.0), "actions": stats_doc(7)})
    with pytest.raises(CheckpointError, match=r"several assets \['droid', 'physical-intelligence/libero'\]"):
        load_norm_stats(tmp_path, "quantiles")
    libero = load_norm_stats(tmp_path, "mean_std", asset="physical-intelligence/libero")
    assert libero.actions.dim == 7 and libero.state.stats["mean"][0] == 5.0
    with pytest.raises(CheckpointError, match="available: .*droid"):
        load_norm_stats(tmp_path, "mean_std", asset="trossen")


def test_openpi_pi05_stats_without_quantiles_fail(tmp_path):
    write_openpi(tmp_path, "a", {"state": stats_doc(8, quantiles=False), "actions": stats_doc(8, quantiles=False)})
    assert load_norm_stats(tmp_path, "mean_std").state.mode == "mean_std"
    with pytest.raises(CheckpointError, match="q01"):
        load_norm_stats(tmp_path, "quantiles")


def write_lerobot(directory, norm_map, eps=1e-8):
    features = {"observation.state": {"type": "STATE", "shape": [4]}, "action": {"type": "ACTION", "shape": [3]}}
    state = {f"observation.state.{k}": torch.arange(4.0) + i for i, k in enumerate(["mean", "std", "q01", "q99"])}
    action = {f"action.{k}": torch.arange(3.0) * (i + 1) for i, k in enumerate(["mean", "std", "q01", "q99"])}
    save_file({**state, **action}, str(directory / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    save_file(action, str(directory / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    step = {"eps": eps, "features": features, "norm_map": norm_map}
    (directory / "policy_preprocessor.json").write_text(json.dumps({"name": "policy_preprocessor", "steps": [
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "normalizer_processor", "config": step,
         "state_file": "policy_preprocessor_step_3_normalizer_processor.safetensors"}]}))
    (directory / "policy_postprocessor.json").write_text(json.dumps({"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor", "config": {**step, "features": {"action": features["action"]}},
         "state_file": "policy_postprocessor_step_0_unnormalizer_processor.safetensors"}]}))


def test_lerobot_processor_files(tmp_path):
    write_lerobot(tmp_path, {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "MEAN_STD"}, eps=1e-4)
    stats = load_norm_stats(tmp_path, "quantiles")
    assert (stats.state.mode, stats.actions.mode) == ("quantiles", "mean_std")
    assert (stats.state.dim, stats.actions.dim) == (4, 3)
    assert stats.state.convention == "lerobot" and stats.state.eps == 1e-4
    np.testing.assert_array_equal(stats.state.stats["q99"], np.arange(4.0) + 3)
    np.testing.assert_array_equal(stats.actions.stats["std"], np.arange(3.0) * 2)
    assert "policy_postprocessor_step_0" in stats.source


def test_openpi_assets_win_over_lerobot_files_and_nothing_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no norm stats"):
        load_norm_stats(tmp_path, "quantiles")
    write_lerobot(tmp_path, {"STATE": "MEAN_STD", "ACTION": "MEAN_STD"})
    assert load_norm_stats(tmp_path, "quantiles").state.convention == "lerobot"
    write_openpi(tmp_path, "x", {"state": stats_doc(4), "actions": stats_doc(3)})
    assert load_norm_stats(tmp_path, "quantiles").state.convention == "openpi"
