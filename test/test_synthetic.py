"""Synthetic checkpoints: real layout, deterministic content, CLI, full-size plan."""

import hashlib
import math
import subprocess
import sys

import torch
from safetensors.torch import load_file

from flashrt_core.checkpoint import read_checkpoint
from flashrt_core.synthetic import (FULL_SHARD_BYTES, plan_shards, synthetic_config, train_tokenizer,
                                    write_checkpoint)
from flashrt_core.weight_maps.pi0 import expected_shapes


def digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.rglob("*")) if f.is_file()}


def test_files_and_determinism(tmp_path):
    a = write_checkpoint("pi0", tmp_path / "a", seed=3)
    b = write_checkpoint("pi0", tmp_path / "b", seed=3)
    c = write_checkpoint("pi0", tmp_path / "c", seed=4)
    names = set(digest(a))
    assert {"model.safetensors", "config.json", "tokenizer.model", "norm_stats.json"} <= names
    assert digest(a) == digest(b)
    assert digest(a)["model.safetensors"] != digest(c)["model.safetensors"]
    assert digest(a)["tokenizer.model"] == digest(c)["tokenizer.model"] and train_tokenizer() == train_tokenizer()
    weights = load_file(str(a / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert (a / "model.safetensors").stat().st_size < 2_000_000


def test_lerobot_layout_files(tmp_path):
    path = write_checkpoint("pi05", tmp_path, layout="lerobot", num_views=3)
    assert all(k.startswith("model.") for k in load_file(str(path / "model.safetensors")))
    assert {"policy_preprocessor.json", "policy_postprocessor.json"} <= {f.name for f in path.iterdir()}
    assert len(read_checkpoint(path).camera_names) == 3


def test_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flashrt_core.synthetic", "pi05", str(tmp_path / "ck"), "--seed", "1"],
                         capture_output=True, text=True, check=True)
    assert "wrote tiny pi05 checkpoint" in out.stdout
    assert read_checkpoint(tmp_path / "ck").config.variant == "pi05"


def test_full_size_dims_and_shard_plan():
    config = synthetic_config("pi05", "full")
    shapes = expected_shapes(config)
    params = sum(math.prod(s) for s in shapes.values())
    assert 3.3e9 < params < 3.4e9  # SigLIP So400m + Gemma 2B (with its 257k embedding) + Gemma 300M
    sizes = {name: math.prod(shapes[name]) * 2 for name in sorted(shapes)}
    shards = plan_shards(sizes, FULL_SHARD_BYTES)
    assert len(shards) == 2 and sum(len(s) for s in shards) == len(shapes)
    assert all(sum(sizes[n] for n in shard) <= FULL_SHARD_BYTES for shard in shards)
    assert plan_shards({"a": 5, "b": 5, "c": 20}, 8) == [["a"], ["b"], ["c"]]
