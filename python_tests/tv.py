"""torchvision's own video model code, for tests only. The registry's torchvision links CUDA
libraries, so ``import torchvision`` fails beside a CPU build of torch; its pure-Python model
files still load when the package's ``__init__`` is bypassed: a module object for
``torchvision`` with the real ``__path__``. Never do this in the library."""
import importlib.util
import sys
import types


def video_models():
    """``torchvision.models.video`` (installed by ``make install``: pip install --no-deps torchvision)."""
    if "torchvision.models.video" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        if spec is None:
            raise ImportError("torchvision is not installed: pip install --no-deps torchvision (make install does)")
        if "torchvision" not in sys.modules or not hasattr(sys.modules["torchvision"], "models"):
            package = types.ModuleType("torchvision")
            package.__path__ = list(spec.submodule_search_locations)
            sys.modules["torchvision"] = package
    return importlib.import_module("torchvision.models.video")
