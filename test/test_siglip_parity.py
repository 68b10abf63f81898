"""SigLIP vision tower vs transformers' SiglipVisionModel / PaliGemma image features.

Both built offline from a tiny config, same random weights, fp32.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashrt_core.models.siglip import SiglipConfig, SiglipVisionTower  # noqa: E402

CFG = SiglipConfig(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=14, image_size=224)


def hf_vision_config():
    return transformers.SiglipVisionConfig(
        hidden_size=CFG.width, intermediate_size=CFG.mlp_dim, num_hidden_layers=CFG.depth,
        num_attention_heads=CFG.num_heads, image_size=CFG.image_size, patch_size=CFG.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
        attn_implementation="eager")


def randomize(module, seed):
    """Every parameter random (LayerNorm scales and biases included), so no weight is a no-op."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def pixels(seed, views=2):
    return torch.rand(views, 3, 224, 224, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vision_tower_matches_transformers():
    hf = transformers.SiglipVisionModel(hf_vision_config()).eval()
    randomize(hf, 0)
    ours = SiglipVisionTower(CFG).eval()
    ours.load_state_dict({k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()})
    x = pixels(1)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        out = ours(x)
    assert out.shape == (2, 256, CFG.width)
    assert rel_err(out, ref) < 1e-5


def test_image_features_are_projected_but_not_scaled():
    """PaliGemma (transformers 5, like openpi's patched copy) feeds projector(vision(x)) to the
    LLM without dividing by sqrt(width); Pi's prefix uses exactly that."""
    text = transformers.GemmaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=24)
    cfg = transformers.PaliGemmaConfig(vision_config=hf_vision_config(), text_config=text, projection_dim=48)
    hf = transformers.PaliGemmaModel(cfg).eval()
    randomize(hf, 2)
    prefix = "vision_tower."  # transformers 5 drops the "vision_model." level here
    ours = SiglipVisionTower(CFG).eval()
    ours.load_state_dict({k.removeprefix(prefix).removeprefix("vision_model."): v
                          for k, v in hf.state_dict().items() if k.startswith(prefix)})
    projector = torch.nn.Linear(CFG.width, 48)
    projector.load_state_dict({"weight": hf.multi_modal_projector.linear.weight,
                               "bias": hf.multi_modal_projector.linear.bias})
    x = pixels(3, views=1)
    with torch.no_grad():
        ref = hf.get_image_features(x).pooler_output
        out = projector(ours(x))
    assert rel_err(out, ref) < 1e-5
