"""The Octomil SDK 4.1.2's federated-learning flow, unmodified, against a real `octomil-lite serve`.

tests/sdk_fl_script.py runs in the SDK's virtualenv (found as tests/test_sdk.py finds it): three
FederatedClients register, pull the base state_dict, train (full weights) and, after an aggregation,
join a round (deltas); the test computes FedAvg by hand from what they sent and compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Server, make_key
from test_sdk import sdk_python  # noqa: F401  -- the SDK interpreter fixture

from octomil_lite import Client

torch = pytest.importorskip("torch")
SCRIPT = Path(__file__).resolve().parent / "sdk_fl_script.py"


class FlRun:
    def __init__(self, report: dict[str, Any], base: dict[str, Any], server: Server, key: str):
        self.report = report
        self.base = base
        self.server = server
        self.key = key

    def step(self, name: str) -> Any:
        got = self.report["steps"][name]
        if not got["ok"]:
            sent = "\n".join(json.dumps(self.report["trace"][i]) for i in got["requests"])
            pytest.fail(f"SDK step {name} raised {got['error']}\nHTTP requests it sent:\n{sent}", pytrace=False)
        return got["value"]

    def error(self, name: str) -> str:
        got = self.report["steps"][name]
        assert not got["ok"], f"{name} should have failed: {got.get('value')}"
        return str(got["error"])


@pytest.fixture(scope="module")
def fl(sdk_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlRun]:  # noqa: F811
    root = tmp_path_factory.mktemp("sdk-fl")
    server = Server(root / "data")
    try:
        write_key = make_key(server.data_dir, "lab-admin", "write")
        device_key = make_key(server.data_dir, "lab-devices", "device")
        torch.manual_seed(0)
        base = torch.nn.Linear(4, 2).state_dict()
        torch.save(base, root / "base.pt")
        name = f"fl-linear-{uuid.uuid4().hex[:6]}"
        with Client(server.url, write_key) as client:
            model = client.create_model(name=name, framework="pytorch")
            client.upload_version(model["id"], root / "base.pt")
        (root / "config.json").write_text(json.dumps({"api_base": f"{server.url}/api/v1", "model": name}))
        env = {**os.environ, "OCTOMIL_LITE_DEVICE_KEY": device_key, "OCTOMIL_LITE_WRITE_KEY": write_key}
        has_torch = subprocess.run([sdk_python, "-c", "import torch"], capture_output=True, check=False)
        if has_torch.returncode != 0:
            env["OCTOMIL_LITE_TORCH_PATH"] = str(Path(torch.__file__).resolve().parent.parent)
        env.pop("OCTOMIL_DEVICE_TYPE", None)
        proc = subprocess.run([sdk_python, str(SCRIPT), str(root / "config.json")], capture_output=True, text=True,
                              timeout=900, env=env, check=False)
        assert proc.returncode == 0, f"sdk_fl_script.py exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        (root / "report.json").write_text(json.dumps(report, indent=1))  # the whole exchange, for people
        yield FlRun(report, base, server, write_key)
    finally:
        server.stop()


def tensors(state: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in state.items()}


def fedavg(sent: list[dict[str, Any]]) -> dict[str, Any]:
    total = sum(s["n"] for s in sent)
    states = [(tensors(s["state"]), s["n"]) for s in sent]
    return {k: sum(state[k] * n for state, n in states) / total for k in states[0][0]}


def test_register_is_idempotent(fl: FlRun) -> None:
    ids = [fl.step(f"register_{i}") for i in range(3)]
    assert len(set(ids)) == 3
    assert fl.step("register_0_again") == ids[0]


def test_pull_model_gives_the_base_state_dict(fl: FlRun) -> None:
    for name, values in fl.step("pull_model").items():
        assert torch.equal(torch.tensor(values), fl.base[name])


def test_train_then_aggregate_is_the_weighted_mean_of_the_full_weights(fl: FlRun) -> None:
    for i in range(3):
        [answer] = fl.step(f"train_{i}")
        assert answer["status"] == "accepted" and answer["update_id"]
    body = fl.step("federation_train")
    assert body["update_count"] == 3 and body["sample_count"] == 60 and body["base_version"] == 1
    expected = fedavg(fl.report["sent"]["train"])
    for name, values in fl.step("pull_aggregated").items():
        torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), expected[name], atol=1e-6, rtol=0)


def test_join_round_with_three_clients_then_aggregate(fl: FlRun) -> None:
    round_id = fl.step("open_round")["round_id"]
    for i in range(3):
        assert fl.step(f"get_round_assignment_{i}")["round_id"] == round_id
        answer = fl.step(f"join_round_{i}")
        assert answer["status"] == "accepted" and answer["round_id"] == round_id
    before = fl.step("get_round_status_before")
    assert before["status"] == "active" and before["participants"] == 3 and before["target_participants"] == 3
    result = fl.step("federation_train_round")
    assert result["round_id"] == round_id, result
    after = fl.step("get_round_status_after")
    assert after["status"] == "completed" and after["result_version"] == result["version"]
    assert [p["sample_count"] for p in after["participant_details"]] == [20, 25, 30]
    # deltas against the round's base: the new version is the weighted mean of what the clients trained
    expected = fedavg(fl.report["sent"]["join"])
    aggregated = fl.step("pull_aggregated")
    final = fl.step("pull_final")
    for name, values in final.items():
        got = torch.tensor(values, dtype=torch.float64)
        torch.testing.assert_close(got, expected[name], atol=1e-6, rtol=0)
        assert not torch.allclose(got, torch.tensor(aggregated[name], dtype=torch.float64))
    assert fl.step("get_round_assignment_after") is None
    listed = subprocess.run([sys.executable, "-m", "octomil_lite.cli", "updates", round_id, "--url", fl.server.url,
                             "--api-key", fl.key], capture_output=True, text=True, timeout=120, check=False)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [(r[1], r[2], r[3], r[6]) for r in rows] == [
        (f"lab-laptop-{i}", "delta/torch", str(n), "aggregated") for i, n in enumerate((20, 25, 30))]


def test_secure_aggregation_and_personalisation_say_why_not(fl: FlRun) -> None:
    for name in ("join_round_secure_aggregation", "get_personalized_model"):
        error = fl.error(name)
        assert "not_implemented" in error and "hosted Octomil platform" in error, error


def test_device_control_and_training_sessions(fl: FlRun) -> None:
    registered = fl.step("control_register")
    assert registered["id"] == fl.step("register_0") and registered["status"] == "active"
    assert fl.step("control_heartbeat")["status"] == "ok"
    assert fl.step("control_refresh")["updated"] is True
    session = fl.step("octomil_train")
    assert session["session_id"]
    status = fl.step("octomil_train_status")
    assert status["status"] == "training" and status["active_rounds"] == [session["session_id"]]
    assert fl.step("octomil_train_stop")["stopped_rounds"] == [session["session_id"]]
