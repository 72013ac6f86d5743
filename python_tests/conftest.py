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


def _patch_the_language_once_per_launch():
    """Triton's interpreter patches ``triton.language`` for a launch, then again at every call of a
    ``@triton.jit`` helper inside it (``inspect.getmembers`` over the whole module each time: ~40%
    of a pipeline test's time, whose kernels call helpers per tile). The launch's patch is still in
    place then, so a helper whose language modules the launch patched skips it. Only what the
    interpreter spends is changed; where its internals differ (another Triton), nothing is."""
    try:
        from triton.runtime import interpreter
        patch, launch, scope = interpreter._patch_lang, interpreter.GridExecutor.__call__, interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return
    patched = []  # per launch running: the language modules patched since it began (a helper's
    # patch is never undone, the launch's at its end)

    def langs(fn):
        return {id(value) for value in fn.__globals__.values() if value is interpreter.tl or value is interpreter.tl.core}

    def patch_lang(fn):
        mine = langs(fn)
        if patched and mine <= patched[-1]:
            return scope()
        if patched:
            patched[-1] |= mine
        return patch(fn)

    def launch_patched(self, *args, **kwargs):
        patched.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()
    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang, launch_patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_per_launch()

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
