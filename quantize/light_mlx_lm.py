"""mlx-lm without transformers for the ranks that hold no tokenizer.

`import mlx_lm.models.cache` runs mlx_lm/__init__.py first, which imports mlx_lm.utils and its
tokenizer_utils, and so transformers: 1.3 s of CPU at every rank's start, though only the ranks
that tokenize (rank 0, the pipeline's last) need it. install() puts a lazy mlx_lm package in
sys.modules: its submodules import as ever, and the package's own __init__ runs the first time
one of its other names (load, generate, convert, __version__...) is read, so what any reader
sees is what it saw before. get_classes and infer_quant_config are mlx_lm.utils' own functions,
compiled from its source without the rest of that module.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
import types

# Names read from the package that need no __init__: the submodules the ranks import.
_LIGHT = frozenset({"models", "sample_utils"})
# mlx_lm.utils' parts a rank needs; the tables _get_classes reads come with it.
_PARTS = ("MODEL_REMAPPING", "MODEL_ARCHITECTURE_REMAPPING", "_get_classes", "infer_quant_config")


class _LazyPackage(types.ModuleType):
    def __getattribute__(self, name: str):
        names = types.ModuleType.__getattribute__(self, "__dict__")
        if "_mlxdist_init" in names:
            if name.startswith("__"):  # __version__, __all__: set by __init__
                needed = name not in names and not hasattr(_LazyPackage, name)
            else:  # a submodule the ranks import, once imported; anything else is __init__'s
                needed = name not in _LIGHT or name not in names
            if needed:
                names.pop("_mlxdist_init")()
        return types.ModuleType.__getattribute__(self, name)


def install() -> None:
    """mlx_lm as a lazy package, unless it is imported already (then nothing changes)."""
    if "mlx_lm" in sys.modules:
        return
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or spec.loader is None:
        return
    package = importlib.util.module_from_spec(spec)
    package.__class__ = _LazyPackage
    package._mlxdist_init = lambda: spec.loader.exec_module(package)
    # What mlx_lm/__init__.py sets before it imports anything that loads transformers.
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    sys.modules["mlx_lm"] = package


def import_all() -> None:
    """All of mlx-lm, transformers with it, imported now in the calling thread. A rank that
    tokenizes calls it in its main thread before its threads start, as when mlx-lm was imported
    whole: transformers imported from two threads at once fails (its lazy names race)."""
    import mlx_lm

    mlx_lm.load  # noqa: B018  (reading a name runs the lazy package's __init__)


def _utils_parts() -> dict:
    """_get_classes and infer_quant_config: mlx_lm.utils' own when it is imported, else the
    same definitions compiled alone from its file (it stays unimported)."""
    if "mlx_lm.utils" not in sys.modules:
        try:
            return _compile_parts()
        except Exception:  # another mlx-lm's file: its module whole, as before
            pass
    utils = importlib.import_module("mlx_lm.utils")
    return {name: getattr(utils, name) for name in _PARTS}


def _compile_parts() -> dict:
    import mlx.core as mx
    import mlx.nn as nn

    spec = importlib.util.find_spec("mlx_lm.utils")
    tree = ast.parse(spec.loader.get_source("mlx_lm.utils"), spec.origin)
    nodes = [node for node in tree.body if _defines(node) in _PARTS]
    if sorted(_defines(node) for node in nodes) != sorted(_PARTS):
        raise LookupError("mlx_lm.utils no longer defines these parts at its top level")
    namespace = {"__name__": "mlx_lm.utils", "importlib": importlib, "mx": mx, "nn": nn}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), spec.origin, "exec"), namespace)
    return {name: namespace[name] for name in _PARTS}


def _defines(node) -> str | None:
    if isinstance(node, ast.FunctionDef):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        return getattr(node.targets[0], "id", None)
    if isinstance(node, ast.AnnAssign):
        return getattr(node.target, "id", None)
    return None


def get_classes(config: dict):
    """mlx_lm.utils._get_classes: the model's (Model, ModelArgs) classes."""
    return _parts()["_get_classes"](config)


def infer_quant_config(path: str, module, weights: dict) -> dict:
    """mlx_lm.utils.infer_quant_config: how a saved weight was quantised."""
    return _parts()["infer_quant_config"](path, module, weights)


_cache: dict = {}


def _parts() -> dict:
    if not _cache:
        _cache.update(_utils_parts())
    return _cache
