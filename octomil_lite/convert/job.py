"""The job protocol between the pool and a converter: what to convert, what came out, and why not.

Imports no framework: the framework modules, routes and the worker all build on it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGETS = ("onnx", "tflite", "coreml")
MAX_INPUT_ELEMENTS = 2**26


class Impossible(Exception):
    """The target cannot be produced from this source at all."""


class Unavailable(Exception):
    """A framework the conversion needs is not installed."""

    def __init__(self, reason: str, extra: str) -> None:
        super().__init__(reason)
        self.extra = extra


@dataclass(frozen=True)
class Job:
    """One conversion request, validated from the payload."""

    src: Path
    kind: str
    hint: str | None
    target: str
    out_dir: Path
    input_shape: tuple[int, ...] | None
    scratch: Path


@dataclass
class Parity:
    """How far the converted model's outputs are from the original's on the sample rows."""

    max_abs_diff: float | None
    tolerance: float
    within: bool | None
    inputs: int
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON form for the result."""
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "within": self.within,
                "inputs": self.inputs, "note": self.note}


@dataclass
class Converted:
    """What a converter produced."""

    path: Path
    parity: Parity
    framework: str
    framework_version: str | None
    converter: str


def installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def require(extra: str, *modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Unavailable(f"this conversion needs {', '.join(missing)}, which is not installed; "
                          f'run: pip install "octomil-lite[{extra}]"', extra)


def dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


DISTRIBUTIONS = {"sklearn": ("scikit-learn",), "xgboost": ("xgboost", "xgboost-cpu"), "lightgbm": ("lightgbm",),
                 "pytorch": ("torch",), "tensorflow": ("tensorflow", "tensorflow-cpu")}


def framework_version(framework: str) -> str | None:
    return next((v for dist in DISTRIBUTIONS[framework] if (v := dist_version(dist))), None)


def parse_job(payload: dict[str, Any], scratch: Path) -> Job:
    """Validate the payload the pool sent into a Job; ValueError says what is wrong."""
    target = payload.get("target")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    shape = (payload.get("options") or {}).get("input_shape")
    input_shape = None
    if shape is not None:
        input_shape = tuple(int(d) for d in shape)
        if not input_shape or any(d <= 0 for d in input_shape):
            raise ValueError(f"input_shape {list(shape)} must be positive integers, e.g. 1,3,32,32")
        elements = 1
        for d in input_shape:
            elements *= d
        if elements > MAX_INPUT_ELEMENTS:
            raise ValueError(f"input_shape {list(shape)} has {elements} elements, over the {MAX_INPUT_ELEMENTS} limit")
    return Job(src=Path(payload["src"]), kind=str(payload.get("kind")), hint=payload.get("framework_hint"),
               target=target, out_dir=Path(payload["out_dir"]), input_shape=input_shape, scratch=scratch)
