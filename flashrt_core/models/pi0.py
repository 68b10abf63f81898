"""Pi0 and Pi0.5: SigLIP + Gemma 2B prefix, Gemma-300M action expert, flow-matching sampler.

Reference semantics: openpi `models/pi0.py` (JAX) and `models_pytorch/pi0_pytorch.py`;
LeRobot `policies/pi0`, `policies/pi05`. One inference (`PiModel.sample_actions`):

1. Prefix = [SigLIP(view_0) ... SigLIP(view_V-1), embed(prompt tokens)]. Image tokens of a
   masked view and padding prompt tokens are invalid; every valid prefix token sees every
   valid prefix token (ar flags all 0). Positions = cumsum(valid) - 1. One Gemma 2B pass
   caches each layer's K (after RoPE) and V; the cache is only read afterwards.
2. Flow: x = noise, t = 1, dt = -1/N; while t >= -dt/2: x += dt * v(x, t); t += dt (fp32).
   v runs the action expert on the suffix, whose queries attend to [valid prefix | suffix]:
   - Pi0: suffix = [state_proj(state) (ar=1), action_time_mlp(action_in_proj(x), sincos(t))
     (first ar=1, rest 0)]: the state token sees prefix + itself; actions see all.
   - Pi0.5: suffix = [action_in_proj(x) (first ar=1, rest 0)]; sincos(t) -> time MLP ->
     adaRMS condition of every expert norm. The state enters as text in the prompt.
   Suffix positions continue after the number of valid prefix tokens.
   v = action_out_proj(final-normed expert output of the last H tokens).

Dtypes follow the reference's bf16 mode: SigLIP, projector, norms and the small
action/time/state projections stay fp32; Gemma / expert matmul weights and the residual
stream use the compute dtype; the flow state x stays fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .gemma import GemmaConfig, GemmaDecoder, gemma_variant, rope_tables
from .siglip import SiglipConfig, SiglipVisionTower, siglip_variant

VARIANTS = ("pi0", "pi05")


@dataclass(frozen=True)
class PiConfig:
    """Shapes and settings of one Pi checkpoint. None fields take the variant's default
    (openpi `Pi0Config`): max_token_len 48 / 200, discrete_state_input False / True,
    norm_mode "mean_std" / "quantiles" for pi0 / pi05."""

    variant: str = "pi05"
    vision: SiglipConfig = field(default_factory=lambda: siglip_variant("So400m/14"))
    vlm: GemmaConfig = field(default_factory=lambda: gemma_variant("gemma_2b"))
    expert: GemmaConfig = field(default_factory=lambda: gemma_variant("gemma_300m"))
    action_dim: int = 32            # padded action width the model reads and writes
    action_horizon: int = 50
    max_token_len: int | None = None
    num_steps: int = 10
    discrete_state_input: bool | None = None  # Pi0.5: the state goes into the prompt as bins
    state_dim: int | None = None    # padded state width (openpi: action_dim; LeRobot: max_state_dim)
    norm_mode: str | None = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown Pi variant {self.variant!r}; expected one of {VARIANTS}")
        defaults = {
            "max_token_len": 200 if self.pi05 else 48,
            "discrete_state_input": self.pi05,
            "state_dim": self.action_dim,
            "norm_mode": "quantiles" if self.pi05 else "mean_std",
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        shared = ("num_heads", "num_kv_heads", "head_dim", "depth")
        mismatched = [a for a in shared if getattr(self.vlm, a) != getattr(self.expert, a)]
        if mismatched:
            raise ValueError(f"VLM and action expert must share {mismatched} for their joint attention")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")

    @property
    def pi05(self) -> bool:
        return self.variant == "pi05"

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches


def make_attn_mask(pad: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    """big_vision prefix-LM mask: i sees j iff cumsum(ar)[j] <= cumsum(ar)[i] and both are valid.

    pad bool [B, N], ar int [N] or [B, N] -> bool [B, N(query), N(key)]."""
    cumsum = torch.cumsum(ar.broadcast_to(pad.shape), dim=1)
    return (cumsum[:, None, :] <= cumsum[:, :, None]) & (pad[:, None, :] & pad[:, :, None])


def suffix_ar(config: PiConfig) -> list[int]:
    """ar flags of the suffix: Pi0 [state=1, act_0=1, act_1..=0]; Pi0.5 [act_0=1, act_1..=0]."""
    actions = [1] + [0] * (config.action_horizon - 1)
    return actions if config.pi05 else [1, *actions]


@dataclass(frozen=True)
class AttentionLayout:
    """Who attends to whom, and the RoPE positions, for one observation (batch 1)."""

    prefix_pad: torch.Tensor        # bool [1, P]: valid prefix tokens
    prefix_mask: torch.Tensor       # bool [1, P, P]
    prefix_positions: torch.Tensor  # int [1, P]
    suffix_mask: torch.Tensor       # bool [1, S, P + S]: suffix queries over [prefix | suffix] keys
    suffix_positions: torch.Tensor  # int [1, S]


def attention_layout(config: PiConfig, image_mask: torch.Tensor, token_mask: torch.Tensor) -> AttentionLayout:
    """image_mask bool [V], token_mask bool [L] -> masks and positions of prefix and suffix."""
    n = config.tokens_per_image
    prefix_pad = torch.cat([image_mask[:, None].expand(-1, n).reshape(-1), token_mask])[None]
    prefix_mask = make_attn_mask(prefix_pad, torch.zeros(prefix_pad.shape[1], dtype=torch.int64,
                                                         device=prefix_pad.device))
    ar = torch.tensor(suffix_ar(config), device=prefix_pad.device)
    suffix_pad = torch.ones(1, len(ar), dtype=torch.bool, device=prefix_pad.device)
    suffix_mask = torch.cat([prefix_pad[:, None, :].expand(1, len(ar), -1), make_attn_mask(suffix_pad, ar)], dim=2)
    return AttentionLayout(
        prefix_pad=prefix_pad, prefix_mask=prefix_mask, prefix_positions=torch.cumsum(prefix_pad, dim=1) - 1,
        suffix_mask=suffix_mask,
        suffix_positions=prefix_pad.sum(-1, keepdim=True) + torch.cumsum(suffix_pad, dim=1) - 1)


def flow_times(num_steps: int) -> list[float]:
    """The t values the sampler visits, accumulated in fp32 as the reference does."""
    dt = np.float32(-1.0 / num_steps)
    t, times = np.float32(1.0), []
    while t >= -dt / np.float32(2):
        times.append(float(t))
        t = np.float32(t + dt)
    return times


def time_embedding(t: float, width: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """sin/cos embedding [1, width] of a scalar t, computed in float64 then cast to fp32."""
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * np.pi)[None, :] * torch.tensor([t], dtype=torch.float32).double()[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).float()


def _swap_prefix(name: str, pairs) -> str:
    for old, new in pairs:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class PiModel(nn.Module):
    """Reference backend: eager PyTorch, any device, fp32 or bf16 compute."""

    # checkpoint (canonical openpi-PyTorch) name prefix -> this module's parameter prefix
    CHECKPOINT_PREFIXES = (
        ("paligemma_with_expert.paligemma.model.vision_tower.vision_model.", "vision."),
        ("paligemma_with_expert.paligemma.model.multi_modal_projector.linear.", "projector."),
        ("paligemma_with_expert.paligemma.model.language_model.", "vlm."),
        ("paligemma_with_expert.gemma_expert.model.", "expert."),
    )

    def __init__(self, config: PiConfig):
        super().__init__()
        self.config = config
        width = config.expert.width
        self.vision = SiglipVisionTower(config.vision)
        self.projector = nn.Linear(config.vision.width, config.vlm.width)
        self.vlm = GemmaDecoder(config.vlm, with_embedding=True)
        self.expert = GemmaDecoder(config.expert, with_embedding=False, cond_dim=width if config.pi05 else None)
        self.action_in_proj = nn.Linear(config.action_dim, width)
        self.action_out_proj = nn.Linear(width, config.action_dim)
        if config.pi05:
            self.time_mlp_in = nn.Linear(width, width)
            self.time_mlp_out = nn.Linear(width, width)
        else:
            self.state_proj = nn.Linear(config.state_dim, width)
            self.action_time_mlp_in = nn.Linear(2 * width, width)
            self.action_time_mlp_out = nn.Linear(width, width)
        self._time_embeddings: dict[tuple[float, str], torch.Tensor] = {}

    # -- construction -------------------------------------------------------------------

    @classmethod
    def module_name(cls, checkpoint_name: str) -> str:
        return _swap_prefix(checkpoint_name, cls.CHECKPOINT_PREFIXES)

    @classmethod
    def checkpoint_name(cls, module_name: str) -> str:
        return _swap_prefix(module_name, [(new, old) for old, new in cls.CHECKPOINT_PREFIXES])

    @staticmethod
    def param_dtype(module_name: str, compute_dtype: torch.dtype) -> torch.dtype:
        """Compute dtype for the Gemma/expert matmul weights and embedding, fp32 elsewhere."""
        is_norm = "layernorm" in module_name or ".norm." in module_name
        in_decoder = module_name.startswith(("vlm.", "expert."))
        return compute_dtype if in_decoder and not is_norm else torch.float32

    @classmethod
    def from_state_dict(cls, config: PiConfig, state_dict: dict[str, torch.Tensor], *,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> PiModel:
        """Build from the canonical weight dict (checkpoint.load_state_dict) without a random init."""
        with torch.device("meta"):
            model = cls(config)
        params = {}
        for name, tensor in state_dict.items():
            module_name = cls.module_name(name)
            # Always a fresh allocation: file-backed tensors can be misaligned, and the CPU
            # kernels then take other code paths (last-bit differences between loads).
            params[module_name] = tensor.to(device=device, dtype=cls.param_dtype(module_name, dtype), copy=True)
        model.load_state_dict(params, strict=True, assign=True)
        return model.eval()

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.vlm.layers[0].self_attn.q_proj.weight.dtype

    # -- pieces of the forward ------------------------------------------------------------

    def embed_prefix(self, pixels, tokens):
        """pixels [V, 3, S, S] in [-1, 1], tokens [L] -> prefix embeddings [1, V * patches + L, width]."""
        image_tokens = self.projector(self.vision(pixels))  # [V, n, width], no sqrt(width) scale
        views, n, width = image_tokens.shape
        return torch.cat([image_tokens.reshape(1, views * n, width).to(self.compute_dtype),
                          self.vlm.embed(tokens[None])], dim=1)

    def cached_time_embedding(self, t: float, device) -> torch.Tensor:
        key = (t, str(device))
        if key not in self._time_embeddings:
            self._time_embeddings[key] = time_embedding(t, self.config.expert.width).to(device)
        return self._time_embeddings[key]

    def velocity(self, x_t, t, state_token, kv_cache, rope, mask):
        """One expert pass: v(x_t, t) [1, H, action_dim] (fp32)."""
        time_emb = self.cached_time_embedding(t, x_t.device)  # [1, width]
        actions = self.action_in_proj(x_t)
        if self.config.pi05:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
            suffix = actions
        else:
            cond = None
            mixed = torch.cat([actions, time_emb[:, None].expand_as(actions)], dim=-1)
            suffix = torch.cat([state_token, self.action_time_mlp_out(F.silu(self.action_time_mlp_in(mixed)))], dim=1)
        out, _ = self.expert(suffix.to(self.compute_dtype), rope, mask, kv_prefix=kv_cache, cond=cond)
        return self.action_out_proj(out[:, -self.config.action_horizon:].float())

    # -- the backend entry point ---------------------------------------------------------

    @torch.inference_mode()
    def sample_actions(self, images, image_mask, tokens, token_mask, state, noise) -> torch.Tensor:
        """images uint8 [V, S, S, 3], image_mask bool [V], tokens int64 [L], token_mask bool [L],
        state fp32 [state_dim] (normalized, padded), noise fp32 [H, action_dim]
        -> normalized actions fp32 [H, action_dim]."""
        cfg, device = self.config, self.action_in_proj.weight.device
        images, image_mask, tokens, token_mask, state, noise = (
            a.to(device) for a in (images, image_mask, tokens, token_mask, state, noise))
        pixels = images.permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0

        layout = attention_layout(cfg, image_mask, token_mask)
        # Prefix: one pass, keep each layer's K/V.
        rope = rope_tables(layout.prefix_positions, cfg.vlm.head_dim, cfg.vlm.rope_theta)
        _, kv_cache = self.vlm(self.embed_prefix(pixels, tokens), rope, layout.prefix_mask)
        # Suffix: same masks and positions at every step.
        rope = rope_tables(layout.suffix_positions, cfg.expert.head_dim, cfg.expert.rope_theta)
        state_token = None if cfg.pi05 else self.state_proj(state.float()[None])[:, None, :]

        x_t = noise.float()[None]
        dt = float(np.float32(-1.0 / cfg.num_steps))
        for t in flow_times(cfg.num_steps):
            x_t = x_t + dt * self.velocity(x_t, t, state_token, kv_cache, rope, layout.suffix_mask)
        return x_t[0]
