"""edgevl: Mini-InternVL vision-language models on edge hardware.

Importing edgevl never imports torch, onnxruntime or tensorrt; backends load them when chosen.
"""
from .api import EdgeVL, GenerationResult, Timings
from .generation import GenerationConfig

__version__ = "0.1.0"
__all__ = ["EdgeVL", "GenerationConfig", "GenerationResult", "Timings", "__version__"]
