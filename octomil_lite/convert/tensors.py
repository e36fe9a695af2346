"""Model weights as named tensors: recognise, inspect and load them with safe loaders only, and FedAvg them.

Encodings: `npy` (one np.save array), `npz` (np.savez archive), `torch` (torch.save of a state_dict). NumPy files
are read with allow_pickle=False; a torch file is only ever opened by the sandboxed worker, with weights_only=True.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

NPY_MAGIC = b"\x93NUMPY"
_MAX_HEADER = 64 * 1024
_MAX_MEMBERS = 100_000

Signature = dict[str, tuple[list[int], str]]  # tensor name -> (shape, dtype name)


class WeightsError(ValueError):
    """The bytes are not weights this registry can read safely, or do not fit the base model."""


def encoding_of(path: Path) -> str | None:
    """npy, npz, torch, or None, from the first bytes and (for a zip) the member names; nothing is unpickled."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(NPY_MAGIC):
        return "npy"
    if not head.startswith(b"PK\x03\x04"):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    if len(names) > _MAX_MEMBERS:
        return None
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    if any(n.rsplit("/", 1)[-1] == "data.pkl" for n in names):
        return "torch"
    return None


def _read_header(f: Any) -> tuple[list[int], str]:
    import numpy as np

    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_MAX_HEADER)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_MAX_HEADER)
    else:
        raise WeightsError(f"unsupported .npy format version {version}")
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise WeightsError(f"array dtype {dtype} is not a plain numeric type")
    return [int(d) for d in shape], dtype.name


def npy_signature(path: Path) -> Signature:
    """The shape and dtype of one .npy array, from its header ('' is its name)."""
    try:
        with open(path, "rb") as f:
            shape, dtype = _read_header(f)
    except (ValueError, OSError, SyntaxError) as exc:
        raise WeightsError(f"not a readable .npy array ({exc})") from None
    return {"": (shape, dtype)}


def npz_signature(path: Path) -> Signature:
    """Shapes and dtypes of an .npz archive's arrays, from their headers alone."""
    found: Signature = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                with zf.open(member) as f:
                    found[member.removesuffix(".npy")] = _read_header(f)
    except WeightsError:
        raise
    except (ValueError, OSError, SyntaxError, zipfile.BadZipFile, EOFError) as exc:
        raise WeightsError(f"not a readable .npz archive ({exc})") from None
    return found


def load_arrays(path: Path, encoding: str) -> dict[str, Any]:
    """Every array of an npy/npz file (allow_pickle=False); an npy array is named ''."""
    import numpy as np

    try:
        if encoding == "npy":
            return {"": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"the {encoding} file cannot be read ({exc})") from None


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def fit_to_base(update: Signature, base: Signature) -> str | None:
    """Why an update's tensors do not fit the base's (names, shapes, dtypes), or None when they do.

    A single unnamed array (np.save) fits a base of one tensor of that shape, or is the base's tensors flattened
    and concatenated in order (all of one dtype)."""
    if set(update) == {""}:
        shape, dtype = update[""]
        if len(base) == 1:
            name, (bshape, bdtype) = next(iter(base.items()))
            if shape == bshape and dtype == bdtype:
                return None
        dtypes = {d for _, d in base.values()}
        total = sum(_numel(s) for s, _ in base.values())
        if len(shape) == 1 and shape[0] == total and dtypes == {dtype}:
            return None
        return (f"one {dtype} array of shape {shape} fits neither the base's tensors nor their {total} values "
                f"flattened ({', '.join(sorted(dtypes))})")
    missing = sorted(set(base) - set(update))
    extra = sorted(set(update) - set(base))
    if missing or extra:
        parts = [f"missing tensors {missing[:5]}" if missing else "", f"unknown tensors {extra[:5]}" if extra else ""]
        return "; ".join(p for p in parts if p)
    for name, (shape, dtype) in base.items():
        got_shape, got_dtype = update[name]
        if got_shape != shape:
            return f"tensor '{name}' has shape {got_shape}, the base has {shape}"
        if got_dtype != dtype:
            return f"tensor '{name}' is {got_dtype}, the base is {dtype}"
    return None


def named(arrays: dict[str, Any], base: Signature) -> dict[str, Any]:
    """An update's arrays by the base's tensor names (undoing the single-array forms fit_to_base accepts)."""
    if set(arrays) != {""}:
        return arrays
    flat = arrays[""]
    if len(base) == 1 and list(flat.shape) == next(iter(base.values()))[0]:
        return {next(iter(base)): flat}
    out, at = {}, 0
    for name, (shape, _) in base.items():
        n = _numel(shape)
        out[name] = flat[at : at + n].reshape(shape)
        at += n
    return out


def nonfinite(arrays: dict[str, Any]) -> list[str]:
    """Names of floating tensors holding NaN or infinity."""
    import numpy as np

    return [name for name, a in arrays.items() if a.dtype.kind in "fc" and not np.isfinite(a).all()]


def fedavg(base: dict[str, Any], updates: Iterator[tuple[dict[str, Any], float, bool]]) -> dict[str, Any]:
    """Weighted mean of full weights (sum_i n_i w_i / sum_i n_i); a delta update counts as base + delta.

    Accumulates in float64 one update at a time; integer tensors (counters) are rounded back."""
    import numpy as np

    sums = {name: np.zeros(a.shape, dtype=np.float64) for name, a in base.items()}
    total = 0.0
    for arrays, weight, is_delta in updates:
        for name, acc in sums.items():
            value = arrays[name].astype(np.float64)
            if is_delta:
                value = value + base[name].astype(np.float64)
            acc += weight * value
        total += weight
    if total <= 0:
        raise WeightsError("the updates' sample counts add up to zero")
    out = {}
    for name, acc in sums.items():
        mean = acc / total
        dtype = base[name].dtype
        out[name] = (np.rint(mean) if dtype.kind in "iub" else mean).astype(dtype)
    return out


def save_npz(path: Path, arrays: dict[str, Any]) -> None:
    import numpy as np

    with open(path, "wb") as f:
        np.savez(f, **arrays)
