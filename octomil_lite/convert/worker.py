"""Job entry point: `python -I -m octomil_lite.convert.worker TASK` reads a JSON payload on stdin.

Only ever started by `Sandbox.run_task`, inside the job's sandbox: its inputs are read-only files under the input
directory, its working directory is the job's scratch, and a file it produces leaves through the output file
descriptor the parent passed. It prints one JSON object as its last stdout line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ..errors import bounded_reason
from .job import Converted, Impossible, Unavailable, parse_job
from .onnx_checks import check_onnx, fold_onnx, onnx_signature
from .routes import converter_for
from .sandbox import OUTPUT_FD_ENV, job_input
from .weights import aggregate_weights, inspect_weights


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Convert one uploaded model as the payload asks; never raises for a bad file."""
    result = _run_job(payload)
    if result.get("reason") is not None:
        result["reason"] = bounded_reason(result["reason"])
    return result


def _run_job(payload: dict[str, Any]) -> dict[str, Any]:
    from .model_checks import RefusedArchive
    from .safe_pickle import RefusedGlobal

    scratch = None
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".work-", dir=payload["out_dir"]))
        # Libraries write temporaries (coremltools, tf2onnx, zip extraction): keep them inside out_dir.
        tempfile.tempdir = str(scratch)
        job = parse_job(payload, scratch)
        converter = converter_for(job)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            done = converter(job)
        return _done_result(done)
    except Impossible as exc:
        return {"status": "impossible", "reason": str(exc)}
    except Unavailable as exc:
        return {"status": "unavailable", "reason": str(exc), "extra": exc.extra}
    except RefusedArchive as exc:
        return {"status": "failed", "reason": str(exc)}
    except RefusedGlobal as exc:
        return {"status": "failed", "reason": f"{exc}; only numpy, scipy, scikit-learn, xgboost and lightgbm "
                                               "model types may appear in an uploaded pickle"}
    except MemoryError:
        return {"status": "failed", "reason": "ran out of memory loading or converting the model "
                                              "(the file may be corrupt or declare enormous tensors)"}
    except Exception as exc:  # noqa: BLE001 - any failure is reported against the user's file
        return {"status": "failed", "reason": _describe(exc)}
    finally:
        tempfile.tempdir = None
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _describe(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _done_result(done: Converted) -> dict[str, Any]:
    signature = None
    if done.path.suffix == ".onnx":
        import onnx

        signature = onnx_signature(onnx.load(str(done.path), load_external_data=False))
    return {"status": "done", "path": str(done.path), "parity": done.parity.as_dict(), "signature": signature,
            "framework": done.framework, "framework_version": done.framework_version, "converter": done.converter}


def _send_output(result: dict[str, Any]) -> dict[str, Any]:
    """Copy the file a task produced in scratch to the output descriptor; the parent reads it from there."""
    produced = result.pop("path", None)
    fd = os.environ.get(OUTPUT_FD_ENV)
    if produced is None or fd is None:
        return result
    with open(produced, "rb") as src, os.fdopen(int(fd), "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    result["output_size"] = os.path.getsize(produced)
    return result


def main() -> None:
    task = sys.argv[1]
    payload = json.loads(sys.stdin.read())
    if task == "check-onnx":
        result = check_onnx(payload)
    elif task == "fold-onnx":
        result = fold_onnx(payload)
    elif task == "inspect-weights":
        result = inspect_weights(payload)
    elif task == "aggregate-weights":
        result = aggregate_weights(payload)
    elif task in ("convert", "quantize"):
        os.mkdir("out")
        files = {"src": job_input("model"), "out_dir": os.path.abspath("out")}
        if task == "quantize":
            from .quantize import quantize

            result = quantize({**payload, **files})
        else:
            result = run_job({**payload, **files})
    else:
        raise SystemExit(f"unknown task {task}")
    sys.stdout.write("\n" + json.dumps(_send_output(result)) + "\n")


if __name__ == "__main__":
    main()
