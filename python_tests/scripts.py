"""The repository's scripts (bench/, docs/) as modules, for their tests: they run as files, not as
an installed package, so each is loaded from its path."""
import importlib.util
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def load(path: str):
    """The script at ``path`` (relative to the repository root) as a module named after its file."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (a dataclass looks its module up)
    spec.loader.exec_module(module)
    return module
