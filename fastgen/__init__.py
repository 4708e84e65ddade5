"""fastgen: Triton kernels for the hot paths of training auto-encoders, VAEs and GANs.

Every fused op has a pure-PyTorch reference (:mod:`fastgen.reference`); :mod:`fastgen.backend`
chooses which one runs. The public layers: :mod:`fastgen.functional` (ops with autograd) and
:mod:`fastgen.nn` (modules).
"""

import importlib.util as _importlib_util
import pathlib as _pathlib
import sys as _sys


def _map_kernels_from_source_tree() -> None:
    # pyproject.toml maps the top-level folder kernels/ to fastgen.kernels; a source tree run with
    # PYTHONPATH=. and no install gets the same mapping here.
    if _importlib_util.find_spec("fastgen.kernels") is not None:
        return
    folder = _pathlib.Path(__file__).resolve().parent.parent / "kernels"
    spec = _importlib_util.spec_from_file_location(
        "fastgen.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise ImportError(f"fastgen.kernels: no kernels package at {folder}")
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["fastgen.kernels"] = module
    spec.loader.exec_module(module)


_map_kernels_from_source_tree()

from fastgen.backend import BACKENDS, get_backend, use_backend  # noqa: E402
from fastgen import functional, nn, reference  # noqa: E402

__all__ = ["BACKENDS", "get_backend", "use_backend", "functional", "nn", "reference"]
__version__ = "0.1.0"
