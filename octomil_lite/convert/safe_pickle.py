"""Open untrusted pickles (plain and joblib) through an allowlist of model types only.

A pickle names the callables it wants run while loading; `find_class` decides which ones it
may get. We allow the data-holding classes of numpy, scipy and scikit-learn (by package,
minus submodules and names that touch files, processes, native code or the interpreter),
the estimator classes of xgboost and lightgbm by exact name, and a few inert builtins.
"""

from __future__ import annotations

import pickle
import types
from pathlib import Path
from typing import Any, BinaryIO

EXACT_ALLOWED: frozenset[tuple[str, str]] = frozenset({
    *(("builtins", n) for n in ("set", "frozenset", "slice", "complex", "bytearray", "bytes", "dict",
                                 "list", "tuple", "int", "float", "bool", "str", "range", "object")),
    ("copyreg", "_reconstructor"), ("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("collections", "deque"),
    ("collections", "Counter"),
    ("_codecs", "encode"),
    ("joblib.numpy_pickle", "NumpyArrayWrapper"),
    *(("xgboost.sklearn", n) for n in ("XGBModel", "XGBClassifier", "XGBRegressor", "XGBRanker",
                                        "XGBRFClassifier", "XGBRFRegressor")),
    ("xgboost.core", "Booster"),
    *(("lightgbm.sklearn", n) for n in ("LGBMModel", "LGBMClassifier", "LGBMRegressor", "LGBMRanker")),
    ("lightgbm.basic", "Booster"),
})

# Packages whose classes and functions are allowed unless a rule below refuses them.
ALLOWED_PACKAGES = ("numpy", "scipy", "sklearn")

# Submodules that read or write files, load native libraries, run tests or compile code.
DENIED_MODULE_PREFIXES = (
    "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.ctypeslib", "numpy.lib.npyio",
    "numpy.lib._npyio_impl", "numpy.lib.format", "numpy.lib._format_impl", "numpy.lib._datasource",
    "numpy.lib.stride_tricks", "numpy.lib._stride_tricks_impl", "numpy.lib.utils", "numpy.lib._utils_impl",
    "numpy.__config__", "numpy._utils", "numpy.typing", "numpy.random._examples",
    "scipy.io", "scipy.datasets", "scipy.misc", "scipy._lib", "scipy.LowLevelCallable",
    "sklearn.datasets", "sklearn.utils._testing", "sklearn.utils.estimator_checks",
    "sklearn.utils._show_versions", "sklearn.utils.discovery", "sklearn.utils._joblib",
    "sklearn.utils.parallel", "sklearn.externals", "sklearn.experimental", "sklearn.utils._mocking",
    "sklearn._build_utils", "sklearn.__check_build",
)

# Words that never belong to a model's data but do name side effects.
DENIED_WORDS = (
    "system", "popen", "exec", "eval", "spawn", "fork", "subprocess", "shell", "import", "getattr",
    "setattr", "delattr", "globals", "compile", "open", "file", "load", "save", "dump", "memmap",
    "ctypes", "library", "url", "fetch", "download", "test", "config", "memory", "strided",
    "parallel", "socket", "pyinstaller",
)

# Protocol 0-2 pickles written by Python 2 name these modules.
MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a callable that is not on the allowlist."""

    def __init__(self, module: str, name: str, why: str) -> None:
        super().__init__(f"refused to unpickle {module}.{name}: {why}")
        self.global_name = f"{module}.{name}"


def _denied_by_rules(module: str, name: str) -> str | None:
    if module.split(".")[0] not in ALLOWED_PACKAGES:
        return "not a numpy, scipy or scikit-learn type"
    path = f"{module}.{name}"
    if any(path == p or path.startswith(p + ".") for p in DENIED_MODULE_PREFIXES):
        return "this module can reach files, processes or native code"
    lowered = path.lower()
    if any(w in lowered for w in DENIED_WORDS):
        return "the name suggests a side effect"
    return None


def _check_request(module: str, name: str) -> None:
    if (module, name) in EXACT_ALLOWED:
        return
    parts = name.split(".")
    if any(p.startswith("__") and p.endswith("__") for p in parts) or not all(parts):
        raise RefusedGlobal(module, name, "dunder or malformed attribute path")
    why = _denied_by_rules(module, name)
    if why:
        raise RefusedGlobal(module, name, why)


def _check_resolved(module: str, name: str, obj: Any) -> None:
    import numpy as np

    if (module, name) in EXACT_ALLOWED:
        return
    if isinstance(obj, np.ufunc):
        return
    if isinstance(obj, types.ModuleType) or not callable(obj):
        raise RefusedGlobal(module, name, "not a class or function")
    home = getattr(obj, "__module__", None)
    if not isinstance(home, str):
        raise RefusedGlobal(module, name, "its defining module is unknown")
    why = _denied_by_rules(home, getattr(obj, "__qualname__", getattr(obj, "__name__", name)))
    if why:
        raise RefusedGlobal(module, name, f"it is {home}.{getattr(obj, '__name__', name)}, {why}")


def find_allowed_class(module: str, name: str) -> Any:
    """Resolve `module.name` for an unpickler, or raise RefusedGlobal before importing anything unsafe."""
    import importlib

    module = MODULE_ALIASES.get(module, module)
    if module == "numpy.core" or module.startswith("numpy.core."):
        # numpy 1.x pickles name numpy.core, a forwarding shim over numpy._core in numpy 2.
        module = "numpy._core" + module[len("numpy.core"):]
    _check_request(module, name)
    first, *rest = name.split(".")
    # Read the module's own namespace: a module-level __getattr__ could import something first.
    obj = vars(importlib.import_module(module)).get(first)
    if obj is None:
        raise RefusedGlobal(module, name, "no such name in that module")
    for part in rest:
        if not isinstance(obj, type):
            raise RefusedGlobal(module, name, "only nested classes may be reached by a dotted name")
        obj = getattr(obj, part)
    _check_resolved(module, name, obj)
    return obj


class AllowlistUnpickler(pickle.Unpickler):
    """A pickle.Unpickler that resolves globals only through `find_allowed_class`."""

    def find_class(self, module: str, name: str) -> Any:
        return find_allowed_class(module, name)


def load(stream: BinaryIO) -> Any:
    """Unpickle one object from a binary stream through the allowlist."""
    return AllowlistUnpickler(stream).load()


def load_joblib(path: str | Path) -> Any:
    """Load a joblib.dump file (compressed or not) through the allowlist, arrays included."""
    from joblib.numpy_pickle import NumpyUnpickler
    from joblib.numpy_pickle_utils import _validate_fileobject_and_memmap

    class AllowlistNumpyUnpickler(NumpyUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            return find_allowed_class(module, name)

    with open(path, "rb") as f, _validate_fileobject_and_memmap(f, str(path)) as (fobj, _):
        if isinstance(fobj, str):
            raise pickle.UnpicklingError("written by joblib older than 0.10 (arrays in side files); re-save it")
        return AllowlistNumpyUnpickler(str(path), fobj, ensure_native_byte_order=True).load()
