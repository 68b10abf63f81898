"""Pi checkpoint directories: config, weights (single or sharded safetensors), validation.

Layouts read:
- openpi PyTorch (`examples/convert_jax_model_to_pytorch.py`): `model.safetensors` with the
  canonical names, `config.json` {action_dim, action_horizon, paligemma_variant,
  action_expert_variant, precision}, `assets/<asset_id>/norm_stats.json`. It does not say
  pi0 vs pi05; the weights do (`time_mlp_in` vs `state_proj`).
- LeRobot (`policies/pi0`, `policies/pi05`): the same names under a `model.` prefix,
  `config.json` with `type`, `chunk_size`, `max_action_dim`, `max_state_dim`,
  `tokenizer_max_length`, `num_inference_steps`, `paligemma_variant`,
  `action_expert_variant`, `image_resolution`, `empty_cameras`, `input_features` /
  `output_features` (camera keys, real state / action widths), processor files for stats.
- Either may be sharded: `model.safetensors.index.json` + the files its weight_map names.
- Models with other widths (synthetic checkpoints) spell their dims out in config.json as
  `vision_config` / `vlm_config` / `expert_config` objects (SiglipConfig / GemmaConfig
  fields); those win over the variant names.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError, UnsupportedModelError
from .models.gemma import GemmaConfig, gemma_variant
from .models.pi0 import VARIANTS, PiConfig
from .models.siglip import SiglipConfig, siglip_variant
from .weight_maps.pi0 import EMBEDDING, TIED_LM_HEAD, UNUSED, canonical_name, expected_shapes

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROGRESS_MIN_BYTES = 1 << 30      # log loading progress for checkpoints from 1 GiB up
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: PiConfig
    layout: str                           # "openpi" | "lerobot"
    camera_names: tuple[str, ...] | None  # LeRobot image features (+ empty cameras), in order
    state_dim: int | None                 # un-padded widths the config declares (LeRobot)
    action_dim: int | None


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    stored_name: str
    shape: tuple[int, ...]
    dtype: str                            # safetensors dtype code, e.g. "BF16"

    @property
    def nbytes(self) -> int:
        n = _DTYPE_BYTES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


def _truncated(names, limit=8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read {index}: {e}") from e
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names shard files that are missing: {_truncated(absent)}")
        return files
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    if (path / "params").is_dir():
        raise CheckpointError(f"{path} is a JAX/Orbax checkpoint (params/); convert it to PyTorch with openpi's "
                              "examples/convert_jax_model_to_pytorch.py first")
    raise CheckpointError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {path}")


def stored_tensors(path: Path) -> dict[str, StoredTensor]:
    """canonical name -> where and how it is stored (reads the safetensors headers only)."""
    tensors: dict[str, StoredTensor] = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    key = canonical_name(name)
                    if key in tensors:
                        raise CheckpointError(f"{key} is stored twice ({tensors[key].stored_name}, {name})")
                    tensors[key] = StoredTensor(file, name, tuple(sl.get_shape()), sl.get_dtype())
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own untyped errors on bad files
            raise CheckpointError(f"cannot read {file}: {e}") from e
    return tensors


def _resolve_embedding(tensors: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    """The PaliGemma embedding under its canonical name even when only the tied lm_head is stored."""
    if EMBEDDING not in tensors and TIED_LM_HEAD in tensors:
        tensors = {**tensors, EMBEDDING: tensors[TIED_LM_HEAD]}
    return {k: v for k, v in tensors.items() if k not in UNUSED}


def check_tensors(path: Path, config: PiConfig, tensors: dict[str, StoredTensor]) -> None:
    expected = expected_shapes(config)
    missing = expected.keys() - tensors.keys()
    unexpected = tensors.keys() - expected.keys()
    misshaped = [f"{k} {list(tensors[k].shape)} (expected {list(s)})"
                 for k, s in expected.items() if k in tensors and tensors[k].shape != s]
    problems = []
    looks_like = "pi05" if "time_mlp_in.weight" in tensors else "pi0" if "state_proj.weight" in tensors else None
    if looks_like not in (None, config.variant):
        problems.append(f"the weights are those of a {looks_like} model")
    if missing:
        problems.append(f"missing {len(missing)} tensors: {_truncated(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors: {_truncated(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} tensors of the wrong shape: {_truncated(misshaped)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match a {config.variant} model with this config: "
                              + "; ".join(problems))


def load_state_dict(path, config: PiConfig, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Canonical weight dict (openpi-PyTorch names, embedding present even when tied),
    validated against `config`; tensors as stored, or cast to `dtype`."""
    path = Path(path)
    tensors = _resolve_embedding(stored_tensors(path))
    check_tensors(path, config, tensors)
    total = sum(t.nbytes for t in tensors.values())
    report_every = total / 10 if total >= PROGRESS_MIN_BYTES else None
    if report_every:
        log.info("loading %d tensors, %.1f GB, from %s", len(tensors), total / 1e9, path)
    state_dict, done, next_report = {}, 0, report_every
    by_file: dict[Path, list[tuple[str, StoredTensor]]] = {}
    for name, t in tensors.items():
        by_file.setdefault(t.file, []).append((name, t))
    for file, entries in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name, t in entries:
                tensor = f.get_tensor(t.stored_name)
                state_dict[name] = tensor if dtype is None else tensor.to(dtype)
                done += t.nbytes
                if report_every and done >= next_report:
                    log.info("  weights %3.0f%% (%.1f / %.1f GB)", 100 * done / total, done / 1e9, total / 1e9)
                    next_report += report_every * (1 + (done - next_report) // report_every)
    return state_dict


# -- config ----------------------------------------------------------------------------


def _variant(path: Path, raw: dict, model: str | None) -> str:
    declared = raw.get("type") or ({True: "pi05", False: "pi0"}.get(raw.get("pi05")))
    if declared is not None and declared not in VARIANTS:
        raise UnsupportedModelError(f"{path}: config.json declares model type {declared!r}; "
                                    f"this loader handles {VARIANTS}")
    if model is not None and model not in VARIANTS:
        raise UnsupportedModelError(f"unknown model {model!r}; expected one of {VARIANTS}")
    if model is not None and declared is not None and model != declared:
        raise UnsupportedModelError(f"{path} is a {declared} checkpoint (config.json), not {model}")
    if model or declared:
        return model or declared
    names = stored_tensors(path).keys()
    if "time_mlp_in.weight" in names:
        return "pi05"
    if "state_proj.weight" in names:
        return "pi0"
    raise UnsupportedModelError(f"cannot tell whether {path} is pi0 or pi05 (no time_mlp_in / state_proj "
                                "weights); pass model=")


def _dims(raw: dict, explicit: str, variant_key: str, default_variant: str, cls, lookup):
    if explicit in raw:
        try:
            return cls(**raw[explicit])
        except TypeError as e:
            raise CheckpointError(f"config.json {explicit}: {e}") from e
    try:
        return lookup(raw.get(variant_key) or default_variant)
    except ValueError as e:
        raise CheckpointError(f"config.json {variant_key}: {e}") from e


def read_checkpoint(path, model: str | None = None) -> CheckpointInfo:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config_path = path / "config.json"
    try:
        raw = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {config_path}: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    lerobot = "type" in raw
    variant = _variant(path, raw, model)
    if raw.get("use_visual_memory") or raw.get("use_proprioceptive_memory"):
        raise UnsupportedModelError(f"{path}: LeRobot MEM observation memory is not supported")

    vision = _dims(raw, "vision_config", "vision_variant", "So400m/14", SiglipConfig, siglip_variant)
    resolution = raw.get("image_resolution")
    if resolution is not None:
        if len(resolution) != 2 or resolution[0] != resolution[1]:
            raise CheckpointError(f"config.json image_resolution {resolution} is not square")
        vision = replace(vision, image_size=int(resolution[0]))

    def number(lerobot_key, openpi_key):
        value = raw.get(lerobot_key if lerobot else openpi_key)
        return None if value is None else int(value)

    action_dim = number("max_action_dim", "action_dim") or 32
    discrete_state = raw.get("discrete_state_input")
    if lerobot and variant == "pi05":
        discrete_state = True  # LeRobot's Pi0.5 always puts the state in the prompt (MEM excluded above)
    try:
        config = PiConfig(
            variant=variant, vision=vision,
            vlm=_dims(raw, "vlm_config", "paligemma_variant", "gemma_2b", GemmaConfig, gemma_variant),
            expert=_dims(raw, "expert_config", "action_expert_variant", "gemma_300m", GemmaConfig, gemma_variant),
            action_dim=action_dim, action_horizon=number("chunk_size", "action_horizon") or 50,
            max_token_len=number("tokenizer_max_length", "max_token_len"),
            num_steps=number("num_inference_steps", "num_steps") or 10,
            discrete_state_input=discrete_state, state_dim=number("max_state_dim", "state_dim"))
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}") from e

    cameras = state_dim = real_action_dim = None
    if lerobot:
        inputs, outputs = raw.get("input_features") or {}, raw.get("output_features") or {}
        cameras = tuple(k for k, f in inputs.items() if f.get("type") == "VISUAL")
        cameras += tuple(f"empty_camera_{i}" for i in range(int(raw.get("empty_cameras") or 0)))
        state_dim = next((f["shape"][0] for f in inputs.values() if f.get("type") == "STATE"), None)
        real_action_dim = next((f["shape"][0] for f in outputs.values() if f.get("type") == "ACTION"), None)
    return CheckpointInfo(path, config, "lerobot" if lerobot else "openpi", cameras or None, state_dim,
                          real_action_dim)
