"""Tensor names and shapes of a Pi0 / Pi0.5 checkpoint in the canonical openpi-PyTorch layout.

Canonical = the names openpi's `PI0Pytorch` module saves (`examples/convert_jax_model_to_pytorch.py`),
without LeRobot's `model.` prefix. The expected set comes from the model definition itself
(PiModel built on the meta device), so names and shapes cannot drift from the code that
consumes them.
"""

from __future__ import annotations

import torch

from ..models.pi0 import PiConfig, PiModel

LEROBOT_PREFIX = "model."
EMBEDDING = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
# safetensors.save_model de-duplicates tied tensors, and often keeps only this name
# for the PaliGemma embedding (openpi #669, lerobot #2307).
TIED_LM_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"
# Present in the PyTorch modules, never used for actions; tolerated and not loaded.
UNUSED = (TIED_LM_HEAD, "paligemma_with_expert.gemma_expert.lm_head.weight")


def expected_shapes(config: PiConfig) -> dict[str, tuple[int, ...]]:
    """canonical name -> shape for every tensor PiModel(config) needs."""
    with torch.device("meta"):
        model = PiModel(config)
    return {PiModel.checkpoint_name(name): tuple(p.shape) for name, p in model.state_dict().items()}


def canonical_name(stored_name: str) -> str:
    """A stored tensor name without the optional LeRobot `model.` prefix."""
    return stored_name[len(LEROBOT_PREFIX):] if stored_name.startswith(LEROBOT_PREFIX) else stored_name
