"""examples/federated_digits.py, run as a user would, against a real `octomil-lite serve`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import Server, make_key

from octomil_lite import Client

EXAMPLE = Path(__file__).parent.parent / "examples" / "federated_digits.py"


def test_federated_digits_registers_every_round_and_its_best_onnx_matches_sklearn(server: Server) -> None:
    key = make_key(server.data_dir, "test-write")
    run = subprocess.run([sys.executable, str(EXAMPLE), "--url", server.url, "--api-key", key, "--rounds", "2",
                          "--clients", "3"], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    best = re.search(r"best: round (\d) \(version (\d) of ([0-9a-f-]{36})\), model_v\d\.onnx agrees with "
                     r"scikit-learn on ([\d.]+)%", run.stdout)
    assert best and float(best.group(4)) >= 99, run.stdout
    printed = re.search(r"^federated model ([0-9a-f-]{36}): one version per round$", run.stdout, re.MULTILINE)
    assert printed and printed.group(1) == best.group(3), run.stdout

    with Client(server.url, key) as client:
        [baseline] = client.list_models(is_baseline=True)
        [federated] = client.list_models(is_baseline=False)
        assert federated["id"] == printed.group(1)
        assert len(client.get_model(baseline["id"])["versions"]) == 1
        assert baseline["accuracy"] is not None and baseline["round_id"] == "central"
        versions = [client.get_version(federated["id"], n) for n in (1, 2)]
        assert [v["round_id"] for v in versions] == ["round-1", "round-2"]
        assert all(0 < v["accuracy"] <= 1 and v["loss"] > 0 for v in versions)
        best_version = versions[int(best.group(2)) - 1]
        assert best_version["accuracy"] == max(v["accuracy"] for v in versions)
        assert best_version["formats"]["onnx"]["status"] == "ready"
