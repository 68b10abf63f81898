"""State normalization and action un-normalization, with the stats a checkpoint ships.

Two sources, each applied with its own reference's formulas:

- openpi `assets/<asset_id>/norm_stats.json` (`shared/normalize.py`, `transforms.py`):
  mean/std for Pi0, quantiles q01/q99 for Pi0.5 (`use_quantile_norm = model_type != PI0`),
  epsilon 1e-6 on both ways, numpy float64:
    mean_std   x_n = (x - mean) / (std + 1e-6)          x = x_n * (std + 1e-6) + mean
    quantiles  x_n = (x - q01) / (q99 - q01 + 1e-6) * 2 - 1
               x   = (x_n + 1) / 2 * (q99 - q01 + 1e-6) + q01
  Un-normalizing a padded action vector: quantiles touch only the stats' dims and pass the
  rest through; mean_std pads mean with 0 and std with 1 (so padded dims come out
  multiplied by 1 + 1e-6). The policy drops padded dims afterwards either way.
- LeRobot processor files (`policy_preprocessor.json` + its `normalizer_processor`
  safetensors, `policy_postprocessor.json` + `unnormalizer_processor`;
  `processor/normalize_processor.py`): mode per feature type from the step's `norm_map`,
  `eps` from its config (default 1e-8), torch float32, and
    MEAN_STD   x_n = (x - mean) / (std + eps)           x = x_n * std + mean
    QUANTILES  x_n = 2 (x - q01) / d - 1, x = (x_n + 1) d / 2 + q01, d = q99 - q01 (eps where 0)
    QUANTILE10 the same with q10 / q90; MIN_MAX the same with min / max; IDENTITY.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from .errors import CheckpointError

log = logging.getLogger(__name__)

OPENPI_EPS = 1e-6
# (low, high) stats of the range modes
_RANGE_STATS = {"quantiles": ("q01", "q99"), "quantile10": ("q10", "q90"), "min_max": ("min", "max")}
_REQUIRED_STATS = {"mean_std": ("mean", "std"), **_RANGE_STATS, "identity": ()}
_LEROBOT_MODES = {"MEAN_STD": "mean_std", "QUANTILES": "quantiles", "QUANTILE10": "quantile10",
                  "MIN_MAX": "min_max", "IDENTITY": "identity"}


@dataclass(frozen=True)
class FeatureNormalizer:
    """(Un)normalizes one feature (the state or the actions) over its first `dim` values."""

    mode: str                      # mean_std | quantiles | quantile10 | min_max | identity
    stats: dict[str, np.ndarray]
    dim: int | None                # un-padded width (None: identity without stats)
    convention: str                # "openpi" | "lerobot"
    eps: float = OPENPI_EPS

    def __post_init__(self):
        missing = [s for s in _REQUIRED_STATS[self.mode] if self.stats.get(s) is None]
        if missing:
            raise CheckpointError(f"{self.mode} normalization needs stats {missing}, which the norm stats lack")

    def _float(self, x):
        return np.asarray(x, dtype=np.float64 if self.convention == "openpi" else np.float32)

    def _stat(self, name, dim):
        return self._float(self.stats[name])[..., :dim]

    def normalize(self, x: np.ndarray) -> np.ndarray:
        x = self._float(x)
        if self.mode == "identity":
            return x
        d = x.shape[-1]
        if self.mode == "mean_std":
            return (x - self._stat("mean", d)) / (self._stat("std", d) + self._float(self.eps))
        low, high = (self._stat(s, d) for s in _RANGE_STATS[self.mode])
        if self.convention == "openpi":
            return (x - low) / (high - low + self._float(self.eps)) * 2.0 - 1.0
        return 2.0 * (x - low) / self._range(low, high) - 1.0

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        """x [..., D] with D >= dim (padded model output) -> same shape, first dim values mapped."""
        x = self._float(x)
        if self.mode == "identity":
            return x
        d = self.dim
        if self.mode == "mean_std" and self.convention == "openpi":
            mean = np.pad(self._stat("mean", d), (0, x.shape[-1] - d), constant_values=0.0)
            std = np.pad(self._stat("std", d), (0, x.shape[-1] - d), constant_values=1.0)
            return x * (std + self._float(self.eps)) + mean
        head = x[..., :d]
        if self.mode == "mean_std":
            head = head * self._stat("std", d) + self._stat("mean", d)
        else:
            low, high = (self._stat(s, d) for s in _RANGE_STATS[self.mode])
            if self.convention == "openpi":
                head = (head + 1.0) / 2.0 * (high - low + self._float(self.eps)) + low
            else:
                head = (head + 1.0) * self._range(low, high) / 2.0 + low
        return np.concatenate([head, x[..., d:]], axis=-1)

    def _range(self, low, high):
        span = high - low
        return np.where(span == 0, self._float(self.eps), span)


@dataclass(frozen=True)
class NormStats:
    state: FeatureNormalizer
    actions: FeatureNormalizer
    source: str                    # file(s) the stats came from, for logs and errors


# -- openpi norm_stats.json ---------------------------------------------------------------


def openpi_assets(checkpoint: Path) -> dict[str, Path]:
    """asset id (path under assets/, e.g. "droid" or "physical-intelligence/libero") -> json."""
    root = checkpoint / "assets"
    return {p.parent.relative_to(root).as_posix(): p for p in sorted(root.glob("**/norm_stats.json"))}


def load_openpi_norm_stats(path: Path, mode: str) -> NormStats:
    try:
        stats = json.loads(path.read_text())["norm_stats"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read openpi norm stats {path}: {e}") from e
    features = {}
    for key in ("state", "actions"):
        if key not in stats:
            raise CheckpointError(f"{path} has no {key!r} stats (keys: {sorted(stats)})")
        arrays = {name: np.asarray(v, dtype=np.float64) for name, v in stats[key].items() if v is not None}
        features[key] = _feature(mode, arrays, None, "openpi", OPENPI_EPS, f"{path} [{key}]")
    return NormStats(features["state"], features["actions"], str(path))


def _feature(mode, arrays, dim, convention, eps, where) -> FeatureNormalizer:
    lengths = {name: a.shape[-1] for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise CheckpointError(f"{where}: stats of different lengths {lengths}")
    dim = dim if dim is not None else next(iter(lengths.values()), None)
    try:
        return FeatureNormalizer(mode, arrays, dim, convention, eps)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None


# -- LeRobot processor files --------------------------------------------------------------


def _processor_step(checkpoint: Path, pipeline: str, registry_name: str):
    """(step config, stats file) of the named step of `<pipeline>.json`, or None."""
    config_path = checkpoint / f"{pipeline}.json"
    if not config_path.is_file():
        return None
    try:
        steps = json.loads(config_path.read_text())["steps"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read LeRobot processor config {config_path}: {e}") from e
    for step in steps:
        if step.get("registry_name") == registry_name:
            state_file = step.get("state_file")
            return step.get("config", {}), (checkpoint / state_file if state_file else None)
    return None


def _lerobot_feature(step, feature_type: str, default_key: str, where: str) -> FeatureNormalizer:
    config, state_file = step
    features = config.get("features", {})
    key = next((k for k, f in features.items() if f.get("type") == feature_type), default_key)
    shape = features.get(key, {}).get("shape")
    mode_name = config.get("norm_map", {}).get(feature_type, "IDENTITY")
    if mode_name not in _LEROBOT_MODES:
        raise CheckpointError(f"{where}: unsupported normalization mode {mode_name!r} for {feature_type}")
    try:
        flat = load_file(str(state_file)) if state_file else {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read LeRobot stats {state_file}: {e}") from e
    arrays = {name.removeprefix(key + "."): a.astype(np.float64)
              for name, a in flat.items() if name.startswith(key + ".")}
    mode = _LEROBOT_MODES[mode_name]
    if not arrays:
        # LeRobot passes a feature through when it has no stats.
        mode = "identity"
    return _feature(mode, arrays, shape[0] if shape else None, "lerobot", float(config.get("eps", 1e-8)),
                    f"{where} [{key}]")


def load_lerobot_norm_stats(checkpoint: Path) -> NormStats | None:
    pre = _processor_step(checkpoint, "policy_preprocessor", "normalizer_processor")
    post = _processor_step(checkpoint, "policy_postprocessor", "unnormalizer_processor") or pre
    if pre is None and post is None:
        return None
    state_step = pre or post
    state = _lerobot_feature(state_step, "STATE", "observation.state", "policy_preprocessor")
    actions = _lerobot_feature(post, "ACTION", "action", "policy_postprocessor")
    files = [str(s[1]) for s in (state_step, post) if s[1] is not None]
    return NormStats(state, actions, ", ".join(dict.fromkeys(files)))


# -- choosing a source --------------------------------------------------------------------


def load_norm_stats(checkpoint: Path, norm_mode: str, asset: str | None = None) -> NormStats:
    """Stats of a checkpoint directory. Looked for in this order: openpi
    `assets/<asset>/norm_stats.json` (`asset` given, or the only one present), LeRobot
    processor files, a `norm_stats.json` next to the weights."""
    checkpoint = Path(checkpoint)
    assets = openpi_assets(checkpoint)
    if asset is not None:
        if asset not in assets:
            raise CheckpointError(f"norm stats asset {asset!r} not found under {checkpoint / 'assets'}; "
                                  f"available: {sorted(assets) or 'none'}")
        return load_openpi_norm_stats(assets[asset], norm_mode)
    if len(assets) > 1:
        raise CheckpointError(f"{checkpoint / 'assets'} holds norm stats for several assets {sorted(assets)}; "
                              "choose one with norm_stats_asset=")
    if assets:
        return load_openpi_norm_stats(next(iter(assets.values())), norm_mode)
    lerobot = load_lerobot_norm_stats(checkpoint)
    if lerobot is not None:
        return lerobot
    if (checkpoint / "norm_stats.json").is_file():
        return load_openpi_norm_stats(checkpoint / "norm_stats.json", norm_mode)
    raise CheckpointError(
        f"no norm stats in {checkpoint}: expected assets/<asset_id>/norm_stats.json (openpi), "
        "policy_preprocessor.json + policy_postprocessor.json with their safetensors (LeRobot), "
        "or norm_stats.json")
