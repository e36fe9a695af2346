"""A 3-client, 3-round Flower run (examples/flower_registry.py) recorded in a real `octomil-lite serve`."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import Server, make_key

from octomil_lite import Client

EXAMPLE = Path(__file__).parent.parent / "examples" / "flower_registry.py"

if importlib.util.find_spec("flwr") is None:
    if os.environ.get("CI") == "true":
        pytest.fail("flwr is missing in CI: install '.[all]' (it includes the flower extra)", pytrace=False)
    pytest.skip("flwr is not installed (pip install -e '.[flower]')", allow_module_level=True)


def test_flower_run_records_one_version_per_round_with_metrics(server: Server, tmp_path: Path) -> None:
    key = make_key(server.data_dir, "flower")
    run = subprocess.run([sys.executable, str(EXAMPLE), "--url", server.url, "--api-key", key, "--rounds", "3",
                          "--clients", "3", "--model", "flower-test"], capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    printed = re.findall(r"round (\d): version (\d+) \(flower-(\w+)-r\d\), 3 clients, 240 examples", run.stdout)
    assert [r[0] for r in printed] == ["1", "2", "3"], run.stdout

    with Client(server.url, key) as client:
        [model] = [m for m in client.list_models() if m["name"] == "flower-test"]
        versions = client.get_model(model["id"])["versions"]
        assert [v["format"] for v in versions] == ["numpy"] * 3
        rounds = sorted(client.list_rounds(model["id"]), key=lambda r: r["config"]["server_round"])
        assert [r["status"] for r in rounds] == ["completed"] * 3
        assert [r["result_version"] for r in rounds] == [v["version"] for v in versions]
        # each round trains the previous round's version; the first one starts from Flower's own parameters
        assert [r["base_version"] for r in rounds] == [None, versions[0]["version"], versions[1]["version"]]
        losses = []
        for r, v in zip(rounds, versions):
            assert r["source"] == "flower" and r["participants"] == 3
            assert r["config"] | {"lr": 0.05, "local_steps": 20, "num_rounds": 3, "clients": 3,
                                  "strategy": "FedAvg"} == r["config"]
            assert {"loss", "num_examples", "eval_loss", "eval_mse"} <= set(r["metrics"])
            assert r["metrics"]["num_examples"] == 240
            assert sorted(p["num_examples"] for p in r["participant_details"]) == [40, 80, 120]
            assert v["round_id"] == r["round_id"] and v["loss"] == pytest.approx(r["metrics"]["loss"])
            losses.append(r["metrics"]["eval_mse"])
        assert losses[0] > losses[1] > losses[2]
        dest = client.download_version(model["id"], versions[-1]["version"], tmp_path / "last.npz", format="numpy")
        with np.load(io.BytesIO(dest.read_bytes()), allow_pickle=False) as got:
            np.testing.assert_allclose(got["w"], [1.5, -2.0, 0.5, 3.0], atol=0.1)
        detail = client.get_version(model["id"], versions[-1]["version"])
        assert detail["formats"]["onnx"]["status"] == "impossible"
    listed = subprocess.run([sys.executable, "-m", "octomil_lite.cli", "rounds", model["id"], "--url", server.url,
                             "--api-key", key], capture_output=True, text=True, timeout=120, check=False)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:6] == ["ROUND", "STATUS", "SOURCE", "BASE", "RESULT", "DEVICES"]
    assert [line.split()[1:3] for line in lines[1:]] == [["completed", "flower"]] * 3
    assert all(" 240 " in line for line in lines[1:])
