"""Checkpoint directories: config parsing (openpi / LeRobot), weights (prefix, tied embedding,
shards), and precise errors for everything that does not match."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_checkpoints import tiny_checkpoint  # noqa: F401
from flashrt_core import checkpoint
from flashrt_core.checkpoint import load_state_dict, read_checkpoint
from flashrt_core.errors import CheckpointError, UnsupportedModelError
from flashrt_core.models.gemma import gemma_variant
from flashrt_core.weight_maps.pi0 import EMBEDDING, TIED_LM_HEAD, expected_shapes

EXPERT_LM_HEAD = "paligemma_with_expert.gemma_expert.lm_head.weight"


def copy_of(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(path, edit):
    """Apply edit(dict name -> tensor) to model.safetensors in place."""
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_openpi_config_and_variant_from_weights(tiny_checkpoint):
    for model in ("pi0", "pi05"):
        info = read_checkpoint(tiny_checkpoint(model))
        assert "pi05" not in json.loads((info.path / "config.json").read_text())  # like openpi's converter
        cfg = info.config
        assert (info.layout, cfg.variant, cfg.action_horizon, cfg.action_dim, cfg.state_dim) == \
            ("openpi", model, 10, 32, 32)
        assert (cfg.vlm.width, cfg.expert.width, cfg.vision.width, cfg.vlm.vocab_size) == (64, 32, 32, 512)
        assert cfg.norm_mode == ("quantiles" if model == "pi05" else "mean_std")
        assert cfg.discrete_state_input == (model == "pi05")
        assert info.camera_names is None


def test_lerobot_config(tiny_checkpoint):
    info = read_checkpoint(tiny_checkpoint("pi05", layout="lerobot"))
    assert info.layout == "lerobot"
    assert info.camera_names == ("observation.images.base_0_rgb", "observation.images.left_wrist_0_rgb")
    assert (info.state_dim, info.action_dim, info.config.max_token_len, info.config.num_steps) == (8, 7, 64, 10)


def test_variant_names_and_field_mapping(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "type": "pi0", "chunk_size": 50, "max_action_dim": 32, "max_state_dim": 24, "tokenizer_max_length": 48,
        "num_inference_steps": 5, "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m",
        "image_resolution": [224, 224], "empty_cameras": 1,
        "input_features": {"observation.images.top": {"type": "VISUAL", "shape": [3, 224, 224]},
                           "observation.state": {"type": "STATE", "shape": [14]}},
        "output_features": {"action": {"type": "ACTION", "shape": [14]}}}))
    info = read_checkpoint(tmp_path)
    cfg = info.config
    assert cfg.vlm == gemma_variant("gemma_2b") and cfg.expert == gemma_variant("gemma_300m")
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.num_patches) == (1152, 27, 256)
    assert (cfg.action_horizon, cfg.state_dim, cfg.num_steps) == (50, 24, 5)
    assert info.camera_names == ("observation.images.top", "empty_camera_0") and info.state_dim == 14
    shapes = expected_shapes(cfg)
    assert shapes["state_proj.weight"] == (1024, 24)
    assert shapes[EMBEDDING] == (257152, 2048)
    assert shapes["paligemma_with_expert.gemma_expert.model.layers.17.self_attn.o_proj.weight"] == (1024, 2048)


def test_model_type_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"type": "pi0_fast"}))
    with pytest.raises(UnsupportedModelError, match="pi0_fast"):
        read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        read_checkpoint(tmp_path)
    with pytest.raises(UnsupportedModelError, match="pi05 checkpoint .* not pi0"):
        read_checkpoint(tiny_checkpoint("pi05", layout="lerobot"), model="pi0")
    with pytest.raises(UnsupportedModelError, match="unknown model"):
        read_checkpoint(tiny_checkpoint("pi05"), model="groot")
    (tmp_path / "config.json").unlink()
    (tmp_path / "params").mkdir()
    with pytest.raises(CheckpointError, match="JAX/Orbax"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("layout", ["openpi", "lerobot"])
def test_canonical_state_dict(tiny_checkpoint, layout):
    path = tiny_checkpoint("pi0", layout=layout)
    stored = load_file(str(path / "model.safetensors"))
    assert (TIED_LM_HEAD in stored or "model." + TIED_LM_HEAD in stored) and EMBEDDING not in stored
    weights = load_state_dict(path, read_checkpoint(path).config)
    assert set(weights) == set(expected_shapes(read_checkpoint(path).config))
    assert torch.equal(weights[EMBEDDING], stored[("model." if layout == "lerobot" else "") + TIED_LM_HEAD])
    assert all(t.dtype == torch.float32 for t in weights.values())
    bf16 = load_state_dict(path, read_checkpoint(path).config, dtype=torch.bfloat16)
    assert bf16[EMBEDDING].dtype == torch.bfloat16


def test_same_weights_in_every_layout(tiny_checkpoint):
    weights = [load_state_dict(p, read_checkpoint(p).config) for p in (
        tiny_checkpoint("pi05"), tiny_checkpoint("pi05", layout="lerobot"),
        tiny_checkpoint("pi05", tied_embedding=False), tiny_checkpoint("pi05", max_shard_bytes=20_000))]
    assert len(list((tiny_checkpoint("pi05", max_shard_bytes=20_000)).glob("model-*-of-*.safetensors"))) > 3
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        assert all(torch.equal(other[k], weights[0][k]) for k in other)


def test_unused_lm_heads_are_tolerated(tiny_checkpoint, tmp_path):
    path = copy_of(tiny_checkpoint("pi0", tied_embedding=False), tmp_path)
    rewrite_weights(path, lambda t: t.update({EXPERT_LM_HEAD: torch.zeros(512, 32), TIED_LM_HEAD: torch.ones(512, 64)}))
    weights = load_state_dict(path, read_checkpoint(path).config)
    assert EXPERT_LM_HEAD not in weights and TIED_LM_HEAD not in weights
    assert not torch.equal(weights[EMBEDDING], torch.ones(512, 64))  # embed_tokens wins over lm_head


def test_mismatches_are_named(tiny_checkpoint, tmp_path):
    path = copy_of(tiny_checkpoint("pi05"), tmp_path)
    config = read_checkpoint(path).config
    layer = "paligemma_with_expert.gemma_expert.model.layers.1"

    def edit(t):
        del t[f"{layer}.mlp.up_proj.weight"]
        t["extra.weight"] = torch.zeros(3)
        t["action_in_proj.weight"] = torch.zeros(32, 31)

    rewrite_weights(path, edit)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path, config)
    message = str(err.value)
    assert f"missing 1 tensors: {layer}.mlp.up_proj.weight" in message
    assert "unexpected 1 tensors: extra.weight" in message
    assert "action_in_proj.weight [32, 31] (expected [32, 32])" in message


def test_long_lists_are_truncated_and_wrong_variant_reported(tiny_checkpoint):
    path = tiny_checkpoint("pi0")
    pi05 = read_checkpoint(tiny_checkpoint("pi05")).config
    with pytest.raises(CheckpointError, match=r"missing 14 tensors: .* \.\.\. and 6 more; unexpected 11") as err:
        load_state_dict(path, pi05)
    assert "the weights are those of a pi0 model" in str(err.value)


def test_broken_files(tiny_checkpoint, tmp_path):
    path = copy_of(tiny_checkpoint("pi0"), tmp_path)
    config = read_checkpoint(path).config
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        load_state_dict(path, config)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_state_dict(path, config)
    sharded = copy_of(tiny_checkpoint("pi0", max_shard_bytes=50_000), tmp_path / "s")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing: model-00002"):
        load_state_dict(sharded, config)


def test_big_checkpoints_log_progress(tiny_checkpoint, monkeypatch, caplog):
    path = tiny_checkpoint("pi0")
    with caplog.at_level(logging.INFO, logger="flashrt_core.checkpoint"):
        load_state_dict(path, read_checkpoint(path).config)
    assert "weights" not in caplog.text  # small: quiet
    monkeypatch.setattr(checkpoint, "PROGRESS_MIN_BYTES", 0)
    with caplog.at_level(logging.INFO, logger="flashrt_core.checkpoint"):
        load_state_dict(path, read_checkpoint(path).config)
    lines = [r.getMessage() for r in caplog.records if "weights" in r.getMessage()]
    assert 1 < len(lines) <= 10 and "100%" in lines[-1]
    percents = [int(line.split("%")[0].split()[-1]) for line in lines]
    assert percents == sorted(set(percents))
