"""infgen: resolution-agnostic decoding of diffusion latents (InfGen, ICCV 2025)."""
from .config import InfGenConfig
from .model import InfGen
from .pipeline import InfGenPipeline

__version__ = "0.1.0"
__all__ = ["InfGen", "InfGenConfig", "InfGenPipeline", "__version__"]
