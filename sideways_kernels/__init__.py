"""sideways-kernels: Sideways depth-parallel training of video networks
(Malinowski et al., CVPR 2020) for PyTorch."""
from ._loader import backends, cpp_available
from . import ops, reference

__all__ = ["backends", "cpp_available", "ops", "reference"]
__version__ = "0.1.0"
