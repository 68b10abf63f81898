"""Synthetic Pi0 / Pi0.5 checkpoints: the real layouts (tensor names, config.json, norm stats,
tokenizer) with random weights, for tests, the built-in demo and GPU timing.

    python -m flashrt_core.synthetic pi05 /tmp/pi05_tiny [--size tiny|full] [--seed N] [--layout openpi|lerobot]

- size "tiny": SigLIP width 32 x 2 layers, Gemma width 64 x 2 (2 heads, 1 kv head, head_dim 16),
  expert width 32, vocab of the bundled tokenizer (512); about 0.3 MB, fp32.
- size "full": So400m/14 + gemma_2b + gemma_300m, vocab 257152, written bf16 (as openpi's
  converter writes by default): about 6.7 GB for pi05 (6.5 GB pi0), in shards generated one
  at a time, so peak memory stays near one shard.
- layout "openpi": canonical names, openpi config.json, `assets/synthetic/norm_stats.json`.
  layout "lerobot": names under `model.`, LeRobot config.json (features, chunk_size, ...)
  and policy_pre/postprocessor files. `norm_format` picks the stats format independently.
- tied_embedding: store the PaliGemma embedding only as `paligemma.lm_head.weight`, as
  safetensors' de-duplication leaves it in real checkpoints; else as `embed_tokens`.
- The weights depend only on (model, size, seed): every layout holds the same model.
- The tokenizer is a small SentencePiece BPE model (byte fallback, so any text encodes;
  PaliGemma's special ids pad 0, eos 1, bos 2, unk 3) trained deterministically on
  generated robot-task prompts.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from safetensors.torch import save_file

from .models.gemma import GemmaConfig
from .models.pi0 import PiConfig
from .models.siglip import SiglipConfig
from .weight_maps.pi0 import EMBEDDING, LEROBOT_PREFIX, TIED_LM_HEAD, expected_shapes

log = logging.getLogger(__name__)

TOKENIZER_VOCAB = 512
STATE_DIM, ACTION_DIM = 8, 7          # real (un-padded) widths in the norm stats
HORIZON = 10
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
FULL_SHARD_BYTES = 4 << 30


def synthetic_config(model: str, size: str) -> PiConfig:
    if size == "full":
        return PiConfig(variant=model, action_horizon=HORIZON)
    if size != "tiny":
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    return PiConfig(
        variant=model, action_horizon=HORIZON, max_token_len=64 if model == "pi05" else 48,
        vision=SiglipConfig(width=32, depth=2, mlp_dim=64, num_heads=2),
        vlm=GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=16,
                        vocab_size=TOKENIZER_VOCAB),
        expert=GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16))


# -- weights --------------------------------------------------------------------------------


def random_tensor(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """Random but well-scaled: weights N(0, 1/fan_in), RMSNorm (1+w) offsets and biases small,
    LayerNorm scales around 1, adaRMS biases O(1) so scale/shift/gate all act.
    Drawn on the generator's device."""
    if len(shape) >= 2:
        return torch.randn(shape, generator=gen, device=gen.device) / math.sqrt(math.prod(shape[1:]))
    x = torch.randn(shape, generator=gen, device=gen.device)
    if "layer_norm" in name or "post_layernorm" in name:
        return 1 + 0.1 * x if name.endswith("weight") else 0.02 * x
    if ".dense." in name:
        return 0.5 * x
    return 0.1 * x if "norm" in name else 0.02 * x


def random_state_dict(config: PiConfig, seed: int = 0, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The canonical weight dict of `config` with random weights, made directly on `device`
    (GPU timing and tests at full size without writing ~7 GB to disk)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return {name: random_tensor(name, shape, gen).to(dtype) for name, shape in sorted(expected_shapes(config).items())}


def random_observation(config: PiConfig, views: int, prompt_tokens: int, seed: int = 0, view_mask=None):
    """Random backend inputs in `sample_actions` order: uint8 images [V, S, S, 3], view mask,
    tokens right-padded to max_token_len with `prompt_tokens` valid, state, noise."""
    gen = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    images = torch.randint(0, 256, (views, size, size, 3), dtype=torch.uint8, generator=gen)
    tokens = torch.randint(1, config.vlm.vocab_size, (config.max_token_len,), generator=gen)
    token_mask = torch.arange(config.max_token_len) < prompt_tokens
    mask = torch.ones(views, dtype=torch.bool) if view_mask is None else torch.tensor(view_mask, dtype=torch.bool)
    state = torch.randn(config.state_dim, generator=gen)
    noise = torch.randn(config.action_horizon, config.action_dim, generator=gen)
    return images, mask, tokens, token_mask, state, noise


def _stored_names(config: PiConfig, layout: str, tied_embedding: bool) -> dict[str, str]:
    """canonical name -> name written to the file."""
    prefix = LEROBOT_PREFIX if layout == "lerobot" else ""
    names = {}
    for name in sorted(expected_shapes(config)):
        stored = TIED_LM_HEAD if (name == EMBEDDING and tied_embedding) else name
        names[name] = prefix + stored
    return names


def plan_shards(sizes: dict[str, int], max_shard_bytes: int | None) -> list[list[str]]:
    """Consecutive groups of tensor names, each under max_shard_bytes (unless one tensor is larger)."""
    shards, current, current_bytes = [], [], 0
    for name, nbytes in sizes.items():
        if current and max_shard_bytes and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    return shards + [current]


def _write_weights(path: Path, config: PiConfig, seed: int, names: dict[str, str], dtype: torch.dtype,
                   max_shard_bytes: int | None) -> None:
    shapes = expected_shapes(config)
    itemsize = torch.finfo(dtype).bits // 8
    shards = plan_shards({name: math.prod(shapes[name]) * itemsize for name in names}, max_shard_bytes)
    gen = torch.Generator().manual_seed(seed)  # one stream over the sorted names: layout-independent
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        tensors = {names[n]: random_tensor(n, shapes[n], gen).to(dtype) for n in shard}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update({names[n]: file for n in shard})
        log.info("wrote %s (%d tensors)", file, len(tensors))
        del tensors
    if len(files) > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                      indent=2))


# -- config.json ----------------------------------------------------------------------------


def _dims_fields(config: PiConfig, size: str) -> dict:
    if size == "full":
        return {}
    return {"vision_config": asdict(config.vision), "vlm_config": asdict(config.vlm),
            "expert_config": asdict(config.expert)}


def _features(num_views: int) -> tuple[dict, dict]:
    inputs = {f"observation.images.{c}": {"type": "VISUAL", "shape": [3, 224, 224]} for c in CAMERAS[:num_views]}
    inputs["observation.state"] = {"type": "STATE", "shape": [STATE_DIM]}
    return inputs, {"action": {"type": "ACTION", "shape": [ACTION_DIM]}}


def _norm_map(config: PiConfig) -> dict:
    mode = "QUANTILES" if config.pi05 else "MEAN_STD"
    return {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}


def _config_json(config: PiConfig, size: str, layout: str, dtype: torch.dtype, num_views: int) -> dict:
    variants = {"paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m"}
    precision = "bfloat16" if dtype == torch.bfloat16 else "float32"
    if layout == "openpi":
        return {"action_dim": config.action_dim, "action_horizon": config.action_horizon, **variants,
                "precision": precision, "max_token_len": config.max_token_len, **_dims_fields(config, size)}
    inputs, outputs = _features(num_views)
    return {"type": config.variant, "n_obs_steps": 1, "input_features": inputs, "output_features": outputs,
            "normalization_mapping": _norm_map(config), "chunk_size": config.action_horizon,
            "n_action_steps": config.action_horizon, "max_state_dim": config.state_dim,
            "max_action_dim": config.action_dim, "num_inference_steps": config.num_steps,
            "tokenizer_max_length": config.max_token_len, **variants, "dtype": precision,
            "image_resolution": [224, 224], "empty_cameras": 0, **_dims_fields(config, size)}


# -- norm stats -----------------------------------------------------------------------------


def synthetic_stats(seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed + 1)
    stats = {}
    for key, dim in (("state", STATE_DIM), ("actions", ACTION_DIM)):
        mean, std = rng.normal(0, 1, dim), rng.uniform(0.2, 2.0, dim)
        stats[key] = {"mean": mean, "std": std, "q01": mean - 2.3 * std, "q99": mean + 2.3 * std,
                      "min": mean - 3 * std, "max": mean + 3 * std}
    return stats


def _write_openpi_stats(path: Path, stats) -> None:
    asset = path / "assets" / "synthetic"
    asset.mkdir(parents=True, exist_ok=True)
    fields = ("mean", "std", "q01", "q99")
    doc = {"norm_stats": {k: {f: v[f].tolist() for f in fields} for k, v in stats.items()}}
    (asset / "norm_stats.json").write_text(json.dumps(doc, indent=2))


def _write_lerobot_stats(path: Path, config: PiConfig, stats, num_views: int) -> None:
    inputs, outputs = _features(num_views)
    norm = {"eps": 1e-8, "norm_map": _norm_map(config)}
    flat = {f"observation.state.{f}": torch.tensor(v, dtype=torch.float32) for f, v in stats["state"].items()}
    actions = {f"action.{f}": torch.tensor(v, dtype=torch.float32) for f, v in stats["actions"].items()}
    pre_file, post_file = ("policy_preprocessor_step_2_normalizer_processor.safetensors",
                           "policy_postprocessor_step_0_unnormalizer_processor.safetensors")
    save_file({**flat, **actions}, str(path / pre_file))
    save_file(actions, str(path / post_file))
    pre = {"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "normalizer_processor", "config": {**norm, "features": {**inputs, **outputs}},
         "state_file": pre_file},
        {"registry_name": "tokenizer_processor", "config": {"tokenizer_name": "google/paligemma-3b-pt-224",
                                                            "max_length": config.max_token_len}},
        {"registry_name": "device_processor", "config": {"device": "cpu"}}]}
    post = {"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor", "config": {**norm, "features": outputs}, "state_file": post_file},
        {"registry_name": "device_processor", "config": {"device": "cpu"}}]}
    (path / "policy_preprocessor.json").write_text(json.dumps(pre, indent=2))
    (path / "policy_postprocessor.json").write_text(json.dumps(post, indent=2))


# -- tokenizer ------------------------------------------------------------------------------


def tokenizer_corpus() -> list[str]:
    verbs = ["pick up the", "put down the", "open the", "close the", "push the", "place the", "stack the",
             "wipe the", "move the", "grasp the"]
    objects = ["red block", "blue cup", "green bowl", "yellow sponge", "towel", "drawer", "lid", "marker",
               "plate", "banana"]
    rng = np.random.default_rng(0)
    lines = []
    for i in range(2000):
        task = f"{verbs[i % 10]} {objects[(i * 7) % 10]}"
        bins = " ".join(str(b) for b in rng.integers(-1, 256, STATE_DIM))
        lines += [f"Task: {task}, State: {bins};\nAction: ", task]
    return lines


def train_tokenizer() -> bytes:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_writer=model, vocab_size=TOKENIZER_VOCAB,
        model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        split_digits=True, character_coverage=1.0, user_defined_symbols=["\n"], num_threads=1, minloglevel=2)
    return model.getvalue()


# -- entry point ----------------------------------------------------------------------------


def write_checkpoint(model: str, path, size: str = "tiny", seed: int = 0, *, layout: str = "openpi",
                     norm_format: str | None = None, tied_embedding: bool = True, num_views: int = 2,
                     dtype: torch.dtype | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write a random-weight Pi checkpoint to `path` (created). Returns the path."""
    if layout not in ("openpi", "lerobot"):
        raise ValueError(f"layout must be 'openpi' or 'lerobot', got {layout!r}")
    norm_format = norm_format or layout
    config = synthetic_config(model, size)
    dtype = dtype or (torch.bfloat16 if size == "full" else torch.float32)
    if size == "full" and max_shard_bytes is None:
        max_shard_bytes = FULL_SHARD_BYTES
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(train_tokenizer())
    stats = synthetic_stats(seed)
    if norm_format == "openpi":
        _write_openpi_stats(path, stats)
    else:
        _write_lerobot_stats(path, config, stats, num_views)
    (path / "config.json").write_text(json.dumps(_config_json(config, size, layout, dtype, num_views), indent=2))
    _write_weights(path, config, seed, _stored_names(config, layout, tied_embedding), dtype, max_shard_bytes)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["pi0", "pi05"])
    parser.add_argument("path")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=["openpi", "lerobot"], default="openpi")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = write_checkpoint(args.model, args.path, args.size, args.seed, layout=args.layout)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"wrote {args.size} {args.model} checkpoint ({args.layout} layout, {size / 1e6:.1f} MB) to {path}")


if __name__ == "__main__":
    main()
