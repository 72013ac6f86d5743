import os

import pytest
import torch

# Triton decides interpreter or compiler for its own library functions (tl.cdiv, ...) when it is
# first imported, and some test modules import it while being collected (torch's FLOP counter
# does, in test_tick_model.py), before test_triton.py's own line runs. Without a GPU the Triton
# tests run in the interpreter, so say so before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sideways_kernels  # noqa: E402

# Fresh random inputs every run; print the seed so a failure can be replayed.
_SEED = torch.seed() % (2**31)


def pytest_report_header(config):
    return [f"sideways torch seed: {_SEED} (set SIDEWAYS_TEST_SEED to replay)", f"backends: {sideways_kernels.backends()}"]


@pytest.fixture(autouse=True)
def _seeded(request):
    import os
    seed = int(os.environ.get("SIDEWAYS_TEST_SEED", _SEED)) + hash(request.node.nodeid) % 10007
    torch.manual_seed(seed)
    yield


requires_cpp = pytest.mark.skipif(not sideways_kernels.cpp_available(),
                                  reason="compiled op library not built: " + str(sideways_kernels.backends().get("cpp_error")))
