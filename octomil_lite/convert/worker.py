"""Job entry point: `python -I -m octomil_lite.convert.worker TASK` reads a JSON payload on stdin.

Only ever started by `Sandbox.run_task`, inside the job's sandbox: its inputs are read-only files under the input
directory, its working directory is the job's scratch, and a file it produces leaves through the output file
descriptor the parent passed. It prints one JSON object as its last stdout line. `worker --warm FAMILY ID` is a
warm job (convert/warm.py): it imports FAMILY's frameworks first, then takes exactly one task from its socket.
"""

from __future__ import annotations

import contextlib
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
from .sandbox import INPUT_DIR_ENV, OUTPUT_FD_ENV, SOCKET_FD_ENV, job_input
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


def run_task(task: str, payload: dict[str, Any]) -> dict[str, Any]:
    """TASK on the inputs under the job's input directory; a file it makes is named by the result's 'path'."""
    if task == "check-onnx":
        return check_onnx(payload)
    if task == "fold-onnx":
        return fold_onnx(payload)
    if task == "inspect-weights":
        return inspect_weights(payload)
    if task == "aggregate-weights":
        return aggregate_weights(payload)
    if task in ("convert", "quantize"):
        os.mkdir("out")
        files = {"src": job_input("model"), "out_dir": os.path.abspath("out")}
        if task == "quantize":
            from .quantize import quantize

            # onnxruntime's quantizer writes a shape-inferred copy next to its input: the input must be in scratch.
            files["src"] = shutil.copyfile(files["src"], "source.onnx")
            return quantize({**payload, **files})
        return run_job({**payload, **files})
    raise SystemExit(f"unknown task {task}")


# What a warm job imports before its task arrives; a missing optional framework is the task's to report.
PRELOADS = {
    "onnx-check": ("onnx", "onnx.checker"),
    "estimators": ("numpy", "onnx", "onnxruntime", "sklearn.linear_model", "sklearn.ensemble", "skl2onnx",
                   "xgboost", "lightgbm", "onnxmltools", "octomil_lite.convert.estimators",
                   "octomil_lite.convert.safe_pickle", "octomil_lite.convert.parity"),
    "torch": ("numpy", "onnx", "onnxruntime", "torch", "torch.export", "torch.onnx", "octomil_lite.convert.torch"),
    "tensorflow": ("numpy", "onnx", "onnxruntime", "tensorflow", "tf2onnx", "octomil_lite.convert.tensorflow"),
}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _rehearse_estimators() -> None:
    """Convert and run a model made here (no upload): the converters' lazy imports and registries load now."""
    try:
        import numpy as np
        import onnxruntime
        from skl2onnx import to_onnx
        from sklearn.linear_model import LogisticRegression

        x = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 0.5], [1.0, 0.2]], dtype=np.float32)
        model = LogisticRegression().fit(x, [0, 1, 0, 1])
        onnx_model = to_onnx(model, x[:1], options={id(model): {"zipmap": False}})
        session = onnxruntime.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: x})
    except Exception:  # noqa: BLE001 - a rehearsal only saves time; the real task reports its own failures
        pass


def _rehearse_torch() -> None:
    """Export a module made here (no upload) with the dynamo exporter and run it, with the exporter's torchlib
    registry kept for the task's export (reuse_onnx_registry); the first export's other lazy setup is paid too."""
    try:
        import onnxruntime
        import torch

        from .torch import DYNAMO_OPSET, reuse_onnx_registry

        reuse_onnx_registry()
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        x = torch.randn(1, 4)
        program = torch.export.export(model, (x,))
        torch.onnx.export(program, (x,), "rehearsal.onnx", dynamo=True, external_data=False, verbose=False,
                          opset_version=DYNAMO_OPSET)  # the task's opset: the registry is cached per opset
        session = onnxruntime.InferenceSession("rehearsal.onnx", providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: x.numpy()})
        os.remove("rehearsal.onnx")
    except Exception:  # noqa: BLE001 - a rehearsal only saves time; the real task reports its own failures
        pass


def warm_main(family: str, worker_id: str) -> None:
    """A warm job: import FAMILY's frameworks, then wait for exactly one task and its inputs on the socket."""
    import importlib
    import socket

    started_fds = [fd for fd in sorted(int(fd) for fd in os.listdir("/proc/self/fd")) if _is_open(fd)]
    sock = socket.socket(fileno=int(os.environ.pop(SOCKET_FD_ENV)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in PRELOADS[family]:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001 - the task reports a missing framework with its fix
                continue
        if family == "estimators":
            _rehearse_estimators()
        elif family == "torch":
            with contextlib.redirect_stdout(sys.stderr):  # the exporter prints progress; stdout is the result's
                _rehearse_torch()
    with contextlib.suppress(OSError):  # taken while importing: the task is queued, the server's end closed
        sock.send(b"ready")
    message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 16)
    sock.close()
    if not message:
        raise SystemExit("the server closed this warm worker")
    request = json.loads(message)
    inputs = Path("job-input")
    for name, fd in zip(request["inputs"], fds, strict=False):
        # A real file in scratch, as a fresh job's bound input is: loaders canonicalise paths (a memfd has none).
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(fd, "rb") as src, open(inputs / name, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    os.environ[INPUT_DIR_ENV] = str(inputs.resolve())
    if request["output"]:
        os.environ[OUTPUT_FD_ENV] = str(fds[len(request["inputs"])])
    result = _send_output(run_task(request["task"], request["payload"]))
    # Tests read this: a warm job is never reused, and had only its socket (besides 0-2) before its task came.
    result["worker"] = {"id": worker_id, "family": family, "fds_before_task": started_fds}
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # the job is discarded: skip the interpreter's teardown of every framework it imported


def main() -> None:
    if sys.argv[1] == "--warm":
        warm_main(sys.argv[2], sys.argv[3])
        return
    result = run_task(sys.argv[1], json.loads(sys.stdin.read()))
    sys.stdout.write("\n" + json.dumps(_send_output(result)) + "\n")


if __name__ == "__main__":
    main()
