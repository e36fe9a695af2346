"""Warm workers (issue 13): started ahead, never reused, never shown an upload before their task, as isolated as a
fresh job, retired when idle, and not used at all when the pool is off. Behaviour only; speed is in bench/."""

from __future__ import annotations

import asyncio
import os
import pickle
import select
import time
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from test_security_isolation import data_dir, sandbox  # noqa: F401 - the real, probed job sandbox

from octomil_lite.convert.sandbox import CHECK_LIMITS, JobFiles, Limits, Sandbox
from octomil_lite.convert.warm import WarmPool, WarmWorker

LIMITS = Limits(timeout=120, memory_bytes=2 * 1024**3)


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), path)
    return path


async def _ready(pool: WarmPool, family: str, timeout: float = 120) -> list[WarmWorker]:
    deadline = time.monotonic() + timeout
    while pool.idle_workers().get(family, {}).get("ready", 0) < pool.size:
        assert time.monotonic() < deadline, "no warm worker became ready"
        await asyncio.sleep(0.05)
    return list(pool._idle[family])


async def test_each_task_gets_a_fresh_worker_that_had_seen_nothing(sandbox: Sandbox, onnx_file: Path) -> None:  # noqa: F811
    pool = WarmPool(sandbox, size=1, idle_timeout=60)
    sandbox.warm = pool
    try:
        first = await sandbox.run_task("check-onnx", {}, CHECK_LIMITS, JobFiles({"model": onnx_file}))
        assert first["ok"] and "worker" not in first  # the first need runs fresh while the family warms up
        seen = []
        for _ in range(3):
            idle = await _ready(pool, "onnx-check")
            idle_before = {w.id: w.started for w in idle}
            started_task = time.monotonic()
            result = await sandbox.run_task("check-onnx", {}, CHECK_LIMITS, JobFiles({"model": onnx_file}))
            assert result["ok"] and result["signature"]["inputs"][0]["name"] == "x"
            worker = result["worker"]
            assert worker["id"] in idle_before and idle_before[worker["id"]] < started_task  # started before it
            # before its task it held stdin/stdout/stderr and its socket, no input, no output
            assert worker["fds_before_task"][:3] == [0, 1, 2] and len(worker["fds_before_task"]) == 4
            seen.append(worker["id"])
            assert all(w.id != worker["id"] for w in pool._idle["onnx-check"])  # discarded, never back in the pool
        assert len(set(seen)) == 3
    finally:
        sandbox.warm = None
        await pool.close()
    assert pool.idle_workers() == {}


async def test_a_warm_conversion_records_parity(sandbox: Sandbox, tmp_path: Path) -> None:  # noqa: F811
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    source = tmp_path / "model.pkl"
    source.write_bytes(pickle.dumps(LogisticRegression(max_iter=300).fit(x, y)))
    pool = WarmPool(sandbox, size=1, idle_timeout=60)
    sandbox.warm = pool
    payload = {"kind": "pickle", "framework_hint": None, "target": "onnx", "options": {}}
    try:
        assert pool.take_family("estimators", LIMITS) is None  # first need: nothing warm yet, the family starts
        await _ready(pool, "estimators")
        result = await sandbox.run_task("convert", payload, LIMITS, JobFiles({"model": source},
                                                                          output=tmp_path / "out.onnx"))
        assert result["status"] == "done" and result["worker"]["family"] == "estimators"
        assert result["parity"]["within"] is True
        onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"))
        assert source.read_bytes() == pickle.dumps(pickle.loads(source.read_bytes()))  # the input is untouched
    finally:
        sandbox.warm = None
        await pool.close()


async def test_a_warm_worker_is_as_isolated_as_a_fresh_job(sandbox: Sandbox) -> None:  # noqa: F811
    pool = WarmPool(sandbox, size=1, idle_timeout=60)
    try:
        pool.take_family("onnx-check", CHECK_LIMITS)
        (worker,) = await _ready(pool, "onnx-check")
        pid = worker.running.init_pid
        assert pid is not None
        for ns in ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
        assert int(status["CapEff"].strip(), 16) == 0
        if worker.running.cgroup is not None:  # the job-wide limits hold from its start, before any task
            assert worker.running.cgroup.pids()
            assert worker.memory_bytes() > 0
    finally:
        await pool.close()
    assert worker.running.proc is None or worker.running.proc.poll() is not None


async def test_idle_families_are_retired(sandbox: Sandbox) -> None:  # noqa: F811
    pool = WarmPool(sandbox, size=1, idle_timeout=1.0)
    try:
        pool.take_family("onnx-check", CHECK_LIMITS)
        deadline = time.monotonic() + 30
        while not pool._idle["onnx-check"]:  # started (perhaps still importing: retirement ends it all the same)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        (worker,) = pool._idle["onnx-check"]
        while pool.idle_workers() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert pool.idle_workers() == {}
        assert worker.running.proc is None or worker.running.proc.poll() is not None  # the job is gone
    finally:
        await pool.close()


async def test_a_worker_that_died_is_replaced_by_a_fresh_job(sandbox: Sandbox, onnx_file: Path) -> None:  # noqa: F811
    pool = WarmPool(sandbox, size=1, idle_timeout=60)
    sandbox.warm = pool
    try:
        pool.take_family("onnx-check", CHECK_LIMITS)
        (worker,) = await _ready(pool, "onnx-check")
        worker.running.kill()
        worker.running.proc.wait()  # type: ignore[union-attr]
        result = await sandbox.run_task("check-onnx", {}, CHECK_LIMITS, JobFiles({"model": onnx_file}))
        assert result["ok"] and "worker" not in result
    finally:
        sandbox.warm = None
        await pool.close()


async def test_without_a_pool_every_task_runs_in_a_fresh_job(sandbox: Sandbox, onnx_file: Path) -> None:  # noqa: F811
    assert sandbox.warm is None
    for _ in range(2):
        result = await sandbox.run_task("check-onnx", {}, CHECK_LIMITS, JobFiles({"model": onnx_file}))
        assert result["ok"] and "worker" not in result


def test_serve_turns_the_pool_off_with_a_flag() -> None:
    from click.testing import CliRunner

    from octomil_lite.cli import main

    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "--no-warm-pool" in help_text and "--warm-pool-size" in help_text and "--warm-idle-timeout" in help_text


def test_a_worker_taken_while_still_importing_runs_its_task(sandbox: Sandbox, onnx_file: Path) -> None:  # noqa: F811
    # The server closes its end of the socket right after the handoff; a worker that had not said "ready" yet
    # must still find its queued task (its "ready" then goes nowhere), not fail with a broken pipe.
    from octomil_lite.convert.warm import run_warm, start_warm

    worker = start_warm(sandbox, "estimators", "still-importing", CHECK_LIMITS)
    assert not worker.poll_ready()  # sklearn, skl2onnx, onnxruntime... take far longer than this line
    done = run_warm(worker, "check-onnx", {}, JobFiles({"model": onnx_file}))
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b'"ok": true' in done.stdout and b'"still-importing"' in done.stdout


def test_a_handoff_to_a_dead_worker_leaves_the_output_path_free_for_the_fresh_job(
        sandbox: Sandbox, onnx_file: Path, tmp_path: Path) -> None:  # noqa: F811
    from octomil_lite.convert.job_process import HandoffFailed
    from octomil_lite.convert.warm import run_warm, start_warm

    worker = start_warm(sandbox, "onnx-check", "dies-before-its-task", CHECK_LIMITS)
    worker.running.kill()
    poller = select.poll()
    poller.register(worker.socket, select.POLLHUP)
    assert poller.poll(10_000), "the killed worker's end of the socket did not close"
    output = tmp_path / "folded.onnx"
    with pytest.raises(HandoffFailed):
        run_warm(worker, "check-onnx", {}, JobFiles({"model": onnx_file}, output))
    assert not output.exists()  # else the fresh job run instead could not create it (O_EXCL)
