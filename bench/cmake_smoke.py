"""Loads the CMake-built op library in a fresh process (without the Python
package, which would register the same namespace) and checks one op against
the reference, so `make cmake-check` proves the CMake build really works."""
import importlib.util
import pathlib
import sys

import torch

torch.ops.load_library(sys.argv[1])
# reference.py alone, by path: importing the package would load its own _C too.
_spec = importlib.util.spec_from_file_location(
    "sideways_reference", pathlib.Path(__file__).parents[1] / "sideways_kernels" / "reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

ring, frame, weight = torch.randn(3, 2, 5, 7, 9, dtype=torch.float64), torch.randn(2, 5, 7, 9, dtype=torch.float64), torch.randn(4, 5, 2, 3, 3, dtype=torch.float64)
args = (1, weight, None, [1, 1], [1, 1], [1, 1], 2, 1)
expected = reference.ring_conv_forward(ring.clone(), frame, *args)
got = torch.ops.sideways.ring_conv_forward(ring.clone(), frame, *args)
torch.testing.assert_close(got, expected)
print(f"cmake-built {sys.argv[1]}: ring_conv_forward matches the reference")
