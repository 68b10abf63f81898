"""Model definitions: shared blocks (SigLIP, Gemma) and one module per model family."""

from .gemma import GemmaConfig, gemma_variant
from .pi0 import PiConfig, PiModel
from .siglip import SiglipConfig, siglip_variant

__all__ = ["GemmaConfig", "PiConfig", "PiModel", "SiglipConfig", "gemma_variant", "siglip_variant"]
