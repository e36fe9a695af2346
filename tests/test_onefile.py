"""The one-file build (dist/octomil-lite, made by scripts/build-onefile) on its own: an empty environment, no
network but loopback, no Python of ours. It serves, converts a pickled sklearn model to ONNX in its hidden worker
mode, exports and imports a bundle, and the ONNX it hands out runs in onnxruntime outside."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

ONEFILE = Path(__file__).resolve().parent.parent / "dist" / "octomil-lite"
IP = "/usr/sbin/ip"

SCENARIO = r"""
set -eu
"$IP" link set lo up
F=$ONEFILE
cd "$WORK"
URL=http://127.0.0.1:$PORT
KEY=$("$F" keys create --name offline --scope admin --data-dir "$WORK/data")
"$F" serve --port "$PORT" --data-dir "$WORK/data" > serve.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
export OCTOMIL_API_KEY="$KEY" OCTOMIL_LITE_URL="$URL"
up=0
for _ in $(seq 60); do
  if "$F" models list > /dev/null 2>&1; then up=1; break; fi
  sleep 0.2
done
[ "$up" = 1 ] || { cat serve.log; exit 1; }
MODEL=$("$F" models create --framework sklearn --description offline)
"$F" upload "$MODEL" model.pkl --label 1.0.0
"$F" download "$MODEL" latest --format onnx --wait 300 -o model.onnx
"$F" export "$MODEL" -o bundle.tar --data-dir "$WORK/data"
"$F" import bundle.tar --data-dir "$WORK/other"
"$F" verify --data-dir "$WORK/other"
"$F" gc --data-dir "$WORK/data"
echo "$MODEL" > model.id
"""


def test_the_file_works_offline_in_an_empty_environment(tmp_path: Path, sklearn_pickle: bytes) -> None:
    if not ONEFILE.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{ONEFILE} was not built; .ci/run builds it with scripts/build-onefile")
        pytest.skip(f"{ONEFILE} is not built (run scripts/build-onefile)")
    for tool in ("unshare", IP):
        if shutil.which(tool) is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"{tool} is missing")
            pytest.skip(f"{tool} is missing")
    (tmp_path / "model.pkl").write_bytes(sklearn_pickle)
    mei_before = set(Path("/tmp").glob("_MEI*"))
    script = tmp_path / "scenario.sh"
    script.write_text(SCENARIO)
    # The variables only tell the script where things are; the file itself gets PATH=/usr/bin:/bin and nothing else.
    command = ["env", "-i", "PATH=/usr/bin:/bin", f"ONEFILE={ONEFILE}", f"WORK={tmp_path}", f"PORT={free_port()}",
               f"IP={IP}", "unshare", "-n", "/bin/sh", str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "serve.log").read_text() if (tmp_path / "serve.log").exists() else ""
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{log}"
    assert "Traceback" not in log, log
    assert "imported 1 new model(s), 1 version(s)" in done.stderr
    assert set(Path("/tmp").glob("_MEI*")) == mei_before  # nothing extracted per start or per conversion job

    import onnxruntime as ort
    from sklearn.base import BaseEstimator

    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    rows = np.random.RandomState(1).rand(8, 4).astype(np.float32)
    model: BaseEstimator = pickle.loads(sklearn_pickle)
    labels = session.run(None, {session.get_inputs()[0].name: rows})[0]
    assert labels.tolist() == model.predict(rows).tolist()  # type: ignore[attr-defined]
