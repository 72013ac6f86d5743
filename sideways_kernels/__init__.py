"""sideways-kernels: Sideways depth-parallel training of video networks
(Malinowski et al., CVPR 2020) for PyTorch.

    from sideways_kernels import SidewaysConv3d, SidewaysPipeline, convert, split_sequential
"""
from ._loader import backends, cpp_available
from . import ops, reference
from .backend import set_backend
from .nn import SidewaysConv3d, convert
from .pipeline import (ClipResult, GraphStage, NonFiniteError, SidewaysPipeline, StreamingError, frame_logits,
                       split_sequential, streaming_problem)

__all__ = [
    "backends", "cpp_available", "ops", "reference", "set_backend",
    "SidewaysConv3d", "convert",
    "SidewaysPipeline", "ClipResult", "NonFiniteError", "StreamingError", "GraphStage", "frame_logits",
    "split_sequential", "streaming_problem", "models",
]
__version__ = "0.1.0"
