"""The official Octomil Python SDK (octomil-sdk==4.1.2), unmodified, against a real `octomil-lite serve`.

The SDK runs in its own virtualenv (it pulls pandas and pyarrow, which the project does not need):
`$OCTOMIL_SDK_PYTHON` if set (it must then have the SDK), else `.sdkvenv/` at the repository root
(which .ci/run makes), else one this module makes in the pytest cache. When none can be had
(no package index) the tests are skipped, saying why.

tests/sdk_script.py makes the SDK calls and prints what each returned, with every HTTP request
the SDK sent; a failing test shows the requests of the step that failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import Server, bearer, make_key

SDK_REQUIREMENT = "octomil-sdk==4.1.2"
SDK_VERSION = "4.1.2"
HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "sdk_script.py"


def _sdk_version(python: str) -> str | None:
    try:
        out = subprocess.run([python, "-c", "import octomil; print(octomil.__version__)"],
                             capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@pytest.fixture(scope="session")
def sdk_python(request: pytest.FixtureRequest) -> str:
    given = os.environ.get("OCTOMIL_SDK_PYTHON")
    if given:
        found = _sdk_version(given)
        assert found == SDK_VERSION, f"OCTOMIL_SDK_PYTHON={given} does not have {SDK_REQUIREMENT} (found {found})"
        return given
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    made = Path(str(cache.mkdir("octomil-sdk"))) if cache else Path(tempfile.gettempdir()) / "octomil-lite-sdk"
    for venv in (HERE.parent / ".sdkvenv", made / SDK_VERSION):
        python = venv / "bin" / "python"
        if python.exists() and _sdk_version(str(python)) == SDK_VERSION:
            return str(python)
    # Make one in the pytest cache: a fresh venv with the SDK from the package index.
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True,
                       capture_output=True, text=True, timeout=300)
        out = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              SDK_REQUIREMENT], capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot make a virtualenv for {SDK_REQUIREMENT}: {exc}")
    if out.returncode != 0 or _sdk_version(str(python)) != SDK_VERSION:
        pytest.skip(f"cannot install {SDK_REQUIREMENT} (no package index?); set OCTOMIL_SDK_PYTHON or make "
                    f".sdkvenv as .ci/run does. pip said: {(out.stderr or out.stdout)[-600:]}")
    return str(python)


def _onnx(seed: int) -> bytes:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LinearRegression

    rng = np.random.RandomState(seed)
    x = rng.rand(20, 3).astype(np.float32)
    model = LinearRegression().fit(x, x @ rng.rand(3))
    return to_onnx(model, x[:1]).SerializeToString()  # type: ignore[no-any-return]


class SdkRun:
    """The server, the files uploaded, and what the SDK script reported for both phases."""

    def __init__(self, server: Server, key: str, files: dict[str, bytes], names: dict[str, str],
                 main: dict[str, Any], again: dict[str, Any]):
        self.server = server
        self.key = key
        self.files = files
        self.names = names
        self.main = main
        self.again = again

    def step(self, name: str, phase: str = "main") -> Any:
        """The value a step returned; fails showing the SDK's error and the HTTP exchange when it raised."""
        report = self.main if phase == "main" else self.again
        got = report["steps"][name]
        if not got["ok"]:
            exchange = "\n".join(json.dumps(report["trace"][i]) for i in got["requests"])
            pytest.fail(f"SDK step {name} raised {got['error']}\nHTTP requests it sent:\n{exchange}", pytrace=False)
        return got["value"]

    def requests(self, name: str, phase: str = "main") -> list[dict[str, Any]]:
        report = self.main if phase == "main" else self.again
        return [report["trace"][i] for i in report["steps"][name]["requests"]]

    def models_named(self, name: str) -> list[dict[str, Any]]:
        found = []
        with httpx.Client(base_url=self.server.url, headers=bearer(self.key), timeout=30) as client:
            offset = 0
            while True:
                page = client.get("/api/v1/models", params={"limit": 100, "offset": offset}).json()
                found += [m for m in page["models"] if m.get("name") == name]
                offset += len(page["models"])
                if not page["models"] or offset >= page["total"]:
                    return found


def _run_script(python: str, phase: str, config: Path, key: str) -> dict[str, Any]:
    env = {**os.environ, "OCTOMIL_LITE_TEST_KEY": key}
    env.pop("OCTOMIL_DEVICE_TYPE", None)  # would make download() ask for a device-specific format
    proc = subprocess.run([python, str(SCRIPT), phase, str(config)], capture_output=True, text=True,
                          timeout=600, env=env, check=False)
    assert proc.returncode == 0, f"sdk_script.py {phase} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def sdk(sdk_python: str, tmp_path_factory: pytest.TempPathFactory, onnx_bytes: bytes,
        sklearn_pickle: bytes) -> Iterator[SdkRun]:
    root = tmp_path_factory.mktemp("sdk")
    server = Server(root / "data")
    try:
        key = make_key(server.data_dir, "sdk-write")  # what a hosted user's key can do: no admin needed
        files = {"onnx_v1": onnx_bytes, "onnx_v2": _onnx(1), "pkl": sklearn_pickle}
        for name, data in files.items():
            (root / f"{name}.{'pkl' if name == 'pkl' else 'onnx'}").write_bytes(data)
        tag = uuid.uuid4().hex[:6]
        names = {"onnx": f"sdk-onnx-{tag}", "pkl": f"sdk-pkl-{tag}", "formats": f"sdk-formats-{tag}",
                 "life": f"sdk-life-{tag}", "fed": f"sdk-fed-{tag}"}
        config = root / "config.json"
        config.write_text(json.dumps({
            "api_base": f"{server.url}/api/v1", "out_dir": str(root / "out"), "names": names,
            "onnx_v1": str(root / "onnx_v1.onnx"), "onnx_v2": str(root / "onnx_v2.onnx"), "pkl": str(root / "pkl.pkl"),
        }))
        main = _run_script(sdk_python, "main", config, key)
        # More models than one default page (20): the SDK lists GET /models?org_id=... with no limit.
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as client:
            for i in range(25):
                resp = client.post("/api/v1/models", json={"framework": "sklearn", "description": f"filler {i}"})
                assert resp.status_code == 201, resp.text
        again = _run_script(sdk_python, "again", config, key)
        yield SdkRun(server, key, files, names, main, again)
    finally:
        server.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_ensure_model_creates_then_finds_by_name(sdk: SdkRun) -> None:
    first = sdk.step("ensure_onnx")
    assert first["name"] == sdk.names["onnx"]
    assert first["framework"] == "sklearn"
    assert first.get("use_case") == "regression"
    again = sdk.step("ensure_onnx_again")
    assert again["id"] == first["id"]
    assert len(sdk.models_named(sdk.names["onnx"])) == 1
    assert sdk.step("ensure_pkl")["id"] != first["id"]


def test_ensure_model_finds_a_model_beyond_the_first_page(sdk: SdkRun) -> None:
    """25 newer models later, ensure_model must still find (not duplicate) the model, and pull_model by name."""
    first = sdk.step("ensure_onnx")
    again = sdk.step("ensure_onnx_again", phase="again")
    assert again["id"] == first["id"]
    assert len(sdk.models_named(sdk.names["onnx"])) == 1
    assert sdk.step("pull_onnx_by_name_again", phase="again")["sha256"] == sha(sdk.files["onnx_v2"])


def test_upload_version_from_path_with_labels(sdk: SdkRun) -> None:
    model_id = sdk.step("ensure_onnx")["id"]
    for step, name in (("upload_onnx_v1", "onnx_v1"), ("upload_onnx_v2", "onnx_v2")):
        got = sdk.step(step)
        assert got["model_id"] == model_id
        assert got["format"] == "onnx"
        assert got["model_hash"] == "sha256:" + sha(sdk.files[name])
        assert got["model_size_bytes"] == len(sdk.files[name])
    got = sdk.step("upload_pkl")
    assert got["format"] == "sklearn"
    assert got["model_hash"] == "sha256:" + sha(sdk.files["pkl"])
    sent = sdk.requests("upload_onnx_v1")[-1]
    assert sent["form"] == {"version": "1.0.0", "description": "first fit"}
    assert sent["files"] == {"file": "onnx_v1.onnx"}


def test_upload_formats_means_conversion_targets(sdk: SdkRun) -> None:
    """`formats="onnx"` on a pickle asks for an ONNX conversion; it does not claim the file is ONNX."""
    got = sdk.step("upload_pkl_formats_onnx")
    assert got["format"] == "sklearn"
    assert got["model_hash"] == "sha256:" + sha(sdk.files["pkl"])


def test_list_models(sdk: SdkRun) -> None:
    listed = sdk.step("list_models")
    names = {m.get("name") for m in listed["models"]}
    assert {sdk.names[n] for n in ("onnx", "pkl", "formats")} <= names
    assert listed["limit"] == 100 and listed["offset"] == 0
    assert {sdk.names[n] for n in ("onnx", "pkl", "formats")} <= {
        m.get("name") for m in sdk.step("list_models_framework")["models"]}
    by_use_case = {m.get("name") for m in sdk.step("list_models_use_case")["models"]}
    assert {sdk.names["pkl"], sdk.names["formats"]} <= by_use_case
    assert sdk.names["onnx"] not in by_use_case


def test_get_model(sdk: SdkRun) -> None:
    got = sdk.step("get_model_onnx")
    assert got["name"] == sdk.names["onnx"] and got.get("use_case") == "regression"
    assert [v["model_hash"] for v in got["versions"]] == ["sha256:" + sha(sdk.files[n]) for n in ("onnx_v1", "onnx_v2")]
    assert got["model_hash"] == "sha256:" + sha(sdk.files["onnx_v2"])
    assert sdk.step("get_model_pkl")["name"] == sdk.names["pkl"]
    assert sdk.step("resolve_model_id_onnx") == got["id"]


def test_get_latest_version(sdk: SdkRun) -> None:
    # The SDK returns str(response["version"]) and puts it in later paths; the label or the number both work.
    assert sdk.step("get_latest_version_onnx") in ("1.1.0", "2")
    assert sdk.step("get_latest_version_info_onnx")["version"] in ("1.1.0", 2)


def test_download_writes_the_uploaded_bytes(sdk: SdkRun) -> None:
    expected = {"download_onnx_latest": "onnx_v2", "download_onnx_v1_default_format": "onnx_v1",
                "download_pkl_sklearn": "pkl", "download_pkl_original": "pkl"}
    for step, name in expected.items():
        got = sdk.step(step)
        assert got["sha256"] == sha(sdk.files[name]), step
        assert Path(got["path"]).read_bytes() == sdk.files[name], step
    assert Path(sdk.step("download_onnx_latest")["path"]).name == "model.onnx"


def test_download_url_is_signed_and_needs_no_key(sdk: SdkRun) -> None:
    payload = sdk.step("get_download_url_onnx")
    url = payload["url"]
    assert url.startswith(sdk.server.url + "/"), url  # absolute: the SDK GETs it with a bare httpx.Client
    assert isinstance(payload.get("expires_at"), str)
    fetched = [r for r in sdk.requests("download_onnx_v1_default_format") if r["method"] == "GET"][-1]
    assert fetched["auth"] is None and fetched["status"] == 200
    resp = httpx.get(url, timeout=30)  # no key, no redirects followed (neither does the SDK)
    assert resp.status_code == 200 and resp.content == sdk.files["onnx_v1"]
    assert resp.headers["x-model-hash"] == "sha256:" + sha(sdk.files["onnx_v1"])
    tampered = url[:-2] + ("AA" if not url.endswith("AA") else "BB")
    assert httpx.get(tampered, timeout=30).status_code in (401, 403)


def test_pull_model_returns_the_uploaded_bytes(sdk: SdkRun) -> None:
    expected = {"pull_onnx_by_name": "onnx_v2", "pull_onnx_by_id_label": "onnx_v1",
                "pull_pkl_by_name_label": "pkl", "pull_pkl_original": "pkl"}
    for step, name in expected.items():
        assert sdk.step(step)["sha256"] == sha(sdk.files[name]), step
    sent = sdk.requests("pull_onnx_by_name")
    assert httpx.URL(sent[-1]["url"]).path.endswith("/versions/2/download") or \
        httpx.URL(sent[-1]["url"]).path.endswith("/versions/1.1.0/download")
    assert all(r["auth"] == "Bearer" for r in sent)


def test_sdk_never_sees_a_server_error(sdk: SdkRun) -> None:
    # 501 is the honest answer (not a failure) for what needs the hosted platform; the SDK does not retry it.
    errors = [r for report in (sdk.main, sdk.again) for r in report["trace"] if r["status"] >= 500
              and not (r["status"] == 501 and json.loads(r["body"])["error"] == "not_implemented")]
    assert not errors, errors


def test_informational_calls_fail_cleanly(sdk: SdkRun) -> None:
    """Calls that may fail (a conversion not ready, a format the model lacks) fail with a JSON 4xx, not a hang."""
    for step in ("download_pkl_onnx", "pull_onnx_default_format"):
        got = sdk.main["steps"][step]
        if not got["ok"]:
            last = sdk.requests(step)[-1]
            assert 400 <= last["status"] < 500 and "error" in json.loads(last["body"]), (step, last)


def _failed_with(sdk: SdkRun, step: str, status: int) -> dict[str, Any]:
    """The step raised, after the server answered `status` with a JSON error; that error body."""
    got = sdk.main["steps"][step]
    assert not got["ok"], (step, got)
    last = sdk.requests(step)[-1]
    assert last["status"] == status, (step, last)
    return json.loads(last["body"])  # type: ignore[no-any-return]


def test_create_version_registers_stored_bytes(sdk: SdkRun) -> None:
    assert "checksum" in _failed_with(sdk, "create_version_bad_checksum", 400)["message"]
    made = sdk.step("create_version")
    assert made["label"] == "2.1.0" and made["version"] == 3 and made["status"] == "draft"
    assert made["model_hash"] == "sha256:" + sha(sdk.files["onnx_v1"])
    sent = sdk.requests("create_version")[-1]["json"]
    assert set(sent) == {"version", "storage_path", "format", "checksum", "size_bytes", "description", "metrics"}


def test_list_versions_newest_first_with_status_and_paging(sdk: SdkRun) -> None:
    listed = sdk.step("list_versions")
    assert [v["label"] for v in listed["versions"]] == ["2.1.0", "2.0.0", "1.0.0"]
    assert [v["status"] for v in listed["versions"]] == ["draft", "published", "published"]
    assert listed["total"] == 3 and listed["versions"][0]["metrics"] == {"rmse": 0.25}
    assert [v["label"] for v in sdk.step("list_versions_draft")["versions"]] == ["2.1.0"]
    page = sdk.step("list_versions_page")
    assert [v["label"] for v in page["versions"]] == ["2.0.0"] and page["total"] == 3
    assert sdk.requests("list_versions")[-1]["url"].endswith("/versions?limit=100&offset=0")


def test_publish_deprecate_and_latest(sdk: SdkRun) -> None:
    assert sdk.step("latest_while_draft") == "2"  # a draft is not latest
    for step in ("publish_version", "publish_version_again"):
        assert sdk.step(step)["status"] == "published"
        assert sdk.requests(step)[-1]["json"] == {}
    assert sdk.step("latest_after_publish") == "3"
    for step in ("deprecate_version", "deprecate_version_again"):
        assert sdk.step(step)["status"] == "deprecated"
    assert sdk.step("latest_after_deprecate") == "2"  # latest skips deprecated versions
    got = sdk.step("download_deprecated")  # deprecating keeps the bytes
    assert Path(got["path"]).read_bytes() == sdk.files["onnx_v1"]


def test_update_version_metrics(sdk: SdkRun) -> None:
    assert sdk.step("update_version_metrics")["metrics"] == {"rmse": 0.2, "mae": 0.1}
    assert sdk.requests("update_version_metrics")[-1]["json"] == {"metrics": {"rmse": 0.2, "mae": 0.1}}
    detail = sdk.step("get_version")
    assert detail["metrics"] == {"rmse": 0.2, "mae": 0.1} and detail["label"] == "2.1.0"


def test_architecture_from_the_upload(sdk: SdkRun) -> None:
    assert sdk.requests("upload_life_v1")[-1]["form"]["architecture"] == "mlp"
    assert sdk.step("get_model_architecture") == {"name": "mlp", "input_dim": 3, "hidden_dim": 8, "output_dim": 1}


def test_federation_and_octomil_construct(sdk: SdkRun) -> None:
    fed_id = sdk.step("federation_construct")
    sent = sdk.requests("federation_construct")
    assert [(r["method"], r["status"]) for r in sent] == [("GET", 200), ("POST", 201)]
    assert sdk.step("federation_construct_again") == fed_id
    assert [r["method"] for r in sdk.requests("federation_construct_again")] == ["GET"]
    assert sdk.step("federation_attach_model")["id"] == sdk.step("ensure_life")["id"]
    assert [m["name"] for m in sdk.step("federation_models")] == [sdk.names["life"]]
    for step in ("federation_invite", "federation_analytics"):
        assert "hosted Octomil platform" in _failed_with(sdk, step, 501)["message"]
    assert sdk.step("octomil_construct")  # its own federation, "default"
    assert sdk.step("octomil_registry_list_versions")["total"] == 3


def test_init_telemetry_and_inference_events(sdk: SdkRun) -> None:
    sdk.step("init")
    sdk.step("telemetry_events")
    assert sdk.step("inference_generate")
    probes = [r for r in sdk.requests("init") if r["url"].endswith("/api/v1/health")]
    assert probes and probes[0]["status"] == 200
    events = sdk.step("get_model_events")["events"]
    assert events["inference.started"]["count"] == 1 and events["inference.completed"]["count"] == 1
    assert events["generation_started"]["count"] == 1 and events["generation_completed"]["count"] == 1
    posted = [r for r in sdk.main["trace"] if r["url"].endswith(("/inference/events", "/telemetry/events"))]
    assert posted and all(r["status"] == 202 for r in posted)


def test_calls_that_need_the_hosted_platform_fail_cleanly(sdk: SdkRun) -> None:
    """Rollouts are not part of a registry: a JSON 404 the SDK raises on, never a 500."""
    last = sdk.requests("federation_deploy")[-1]
    assert last["status"] == 404 and "error" in json.loads(last["body"])


def test_optimize_compatibility_and_device_config(sdk: SdkRun) -> None:
    got = sdk.step("optimize")
    assert sdk.requests("optimize")[-1]["json"] == {"accuracy_threshold": 0.5, "target_devices": ["pixel_8"]}
    assert {"feasible", "original_size_mb", "optimized_size_mb", "compression_ratio", "optimizations_applied",
            "converted_paths", "report", "runtime_recommendation"} <= set(got)
    assert got["version"] == 2 and set(got["report"]) == {"onnx-int8", "onnx-fp16"}
    # A LinearRegressor is one ai.onnx.ml node: onnxruntime cannot int8-quantize it and says so; fp16 works but
    # saves nothing, so the answer is an honest "not feasible", with both reasons.
    int8, fp16 = got["report"]["onnx-int8"], got["report"]["onnx-fp16"]
    assert int8["status"] == "impossible" and int8["reason"], int8
    assert fp16["status"] == "ready" and fp16["parity"]["max_abs_diff"] < 0.01, fp16
    assert got["feasible"] is False and "onnx-int8:" in got["reason"] and "onnx-fp16:" in got["reason"], got
    assert sdk.step("download_fp16")["size"] == fp16["size_bytes"]
    compat = sdk.step("check_compatibility")
    assert compat["unknown_devices"] == ["pixel_8", "iphone_15"] and compat["compatible_devices"] == []
    assert sdk.step("get_device_config")["format"] == "onnx"
    assert Path(sdk.step("download_for_device")["path"]).read_bytes() == sdk.files["onnx_v2"]
