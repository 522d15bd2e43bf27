"""infgen: resolution-agnostic decoding of diffusion latents (InfGen, ICCV 2025)."""
from .config import InfGenConfig
from .model import InfGen

__version__ = "0.1.0"
__all__ = ["InfGen", "InfGenConfig", "__version__"]
