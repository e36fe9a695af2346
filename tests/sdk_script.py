"""Drive octomil-lite with the public Octomil Python SDK, unmodified (run by tests/test_sdk.py).

Runs under a separate interpreter that has `octomil-sdk==4.1.2` installed, never under the
project's own. Usage:

    OCTOMIL_LITE_TEST_KEY=oml_... python sdk_script.py PHASE CONFIG.json

CONFIG holds api_base, out_dir, names (onnx, pkl, formats, life, fed) and the files to upload (onnx_v1,
onnx_v2, pkl). PHASE is `main` (the whole flow) or `again` (ensure_model and pull_model by name
once more, after the test has made the model list longer than one page).

Prints one JSON object on stdout: {"steps": {name: {"ok": bool, "value"|"error": ...}}, "trace": [...]}.
Every step runs even when an earlier one failed (it then uses whatever it can), so one run reports
every call that does not work. The trace records each HTTP request the SDK made (method, URL,
JSON body or multipart field names, whether it carried a key) and its status, plus the body of
every error response.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import httpx

TRACE: list[dict[str, Any]] = []
_send = httpx.Client.send


def _traced_send(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
    """Record the request and its response status; the request itself is untouched."""
    entry: dict[str, Any] = {"method": request.method, "url": str(request.url),
                             "auth": request.headers.get("authorization", "").split(" ")[0] or None}
    ctype = request.headers.get("content-type", "").split(";")[0]
    if ctype:
        entry["content_type"] = ctype
    try:
        if ctype == "application/json":
            entry["json"] = json.loads(request.content)
        elif ctype == "multipart/form-data":
            fields = getattr(request.stream, "fields", [])
            entry["form"] = {f.name: getattr(f, "value", None) for f in fields if not hasattr(f, "file")}
            entry["files"] = {f.name: f.filename for f in fields if hasattr(f, "file")}
    except Exception as exc:  # noqa: BLE001 -- the trace is best effort; never disturb the request
        entry["trace_error"] = repr(exc)
    response = _send(self, request, **kwargs)
    entry["status"] = response.status_code
    if response.status_code >= 300 and not kwargs.get("stream"):
        entry["body"] = response.text[:600]
    TRACE.append(entry)
    return response


httpx.Client.send = _traced_send  # type: ignore[method-assign]

# Imported after the patch above, so that every request the SDK sends is traced.
from octomil.python.octomil.federated_client import FederatedClient  # noqa: E402
from octomil.python.octomil.registry import ModelRegistry  # noqa: E402

STEPS: dict[str, dict[str, Any]] = {}


def step(name: str, fn: Callable[[], Any]) -> Any:
    """Run one SDK call; record its JSON-able result or its error, and the requests it made."""
    first = len(TRACE)
    t0 = time.monotonic()
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 -- every SDK failure is a result to report
        STEPS[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:800]}",
                       "where": traceback.format_exc(limit=-2)[-600:]}
        value = None
    else:
        STEPS[name] = {"ok": True, "value": value}
    STEPS[name]["requests"] = list(range(first, len(TRACE)))
    STEPS[name]["seconds"] = round(time.monotonic() - t0, 3)
    return value


def file_info(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = f.read()
    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def bytes_info(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "head": data[:16].hex()}


def main() -> None:
    phase, config_path = sys.argv[1], sys.argv[2]
    with open(config_path) as f:
        cfg = json.load(f)
    key = os.environ["OCTOMIL_LITE_TEST_KEY"]
    api_base = cfg["api_base"]
    out = cfg["out_dir"]
    names = cfg["names"]

    def token() -> str:
        return key

    # Exactly as a hosted-platform script would build them: only api_base changes.
    registry = ModelRegistry(auth_token_provider=token, api_base=api_base)
    client = FederatedClient(auth_token_provider=token, api_base=api_base)

    def model_id(result: Any, fallback: str) -> str:
        return result["id"] if isinstance(result, dict) and "id" in result else fallback

    if phase == "again":
        step("ensure_onnx_again", lambda: registry.ensure_model(
            name=names["onnx"], framework="sklearn", use_case="regression", description="ONNX linear regression"))
        step("pull_onnx_by_name_again", lambda: bytes_info(client.pull_model(names["onnx"], format="onnx")))
        print(json.dumps({"steps": STEPS, "trace": TRACE}))
        return

    # 1. ensure_model, twice for the same name: the second call must return the first model.
    onnx_model = step("ensure_onnx", lambda: registry.ensure_model(
        name=names["onnx"], framework="sklearn", use_case="regression", description="ONNX linear regression"))
    step("ensure_onnx_again", lambda: registry.ensure_model(
        name=names["onnx"], framework="sklearn", use_case="regression", description="ONNX linear regression"))
    pkl_model = step("ensure_pkl", lambda: registry.ensure_model(
        name=names["pkl"], framework="sklearn", use_case="classification"))
    onnx_id = model_id(onnx_model, names["onnx"])
    pkl_id = model_id(pkl_model, names["pkl"])

    # 2. upload_version_from_path with version labels (the SDK requires one; its CLI defaults to 1.0.0).
    step("upload_onnx_v1", lambda: registry.upload_version_from_path(
        onnx_id, cfg["onnx_v1"], version="1.0.0", description="first fit"))
    step("upload_onnx_v2", lambda: registry.upload_version_from_path(
        onnx_id, cfg["onnx_v2"], version="1.1.0", description="second fit"))
    step("upload_pkl", lambda: registry.upload_version_from_path(pkl_id, cfg["pkl"], version="1.0.0"))
    # `formats` is, in the SDK and its CLI (`octomil push --formats`), the comma-separated list of
    # target formats for server-side conversion, not the format of the file being uploaded.
    fmt_model = step("ensure_formats", lambda: registry.ensure_model(
        name=names["formats"], framework="sklearn", use_case="classification"))
    step("upload_pkl_formats_onnx", lambda: registry.upload_version_from_path(
        model_id(fmt_model, names["formats"]), cfg["pkl"], version="1.0.0", formats="onnx"))

    # 3. reads.
    step("list_models", lambda: registry.list_models())
    step("list_models_framework", lambda: registry.list_models(framework="sklearn"))
    step("list_models_use_case", lambda: registry.list_models(use_case="classification"))
    step("get_model_onnx", lambda: registry.get_model(onnx_id))
    step("get_model_pkl", lambda: registry.get_model(pkl_id))
    latest = step("get_latest_version_onnx", lambda: registry.get_latest_version(onnx_id))
    step("get_latest_version_info_onnx", lambda: registry.get_latest_version_info(onnx_id))
    step("resolve_model_id_onnx", lambda: registry.resolve_model_id(names["onnx"]))

    # 4. download: GET .../download-url?format=F (with the key), then GET the returned url (without it).
    step("get_download_url_onnx", lambda: registry.get_download_url(onnx_id, "1.0.0", fmt="onnx"))
    step("download_onnx_latest", lambda: file_info(registry.download(
        onnx_id, latest or "1.1.0", os.path.join(out, "onnx_latest"), format="onnx")["model_path"]))
    # No format and no OCTOMIL_DEVICE_TYPE: the SDK asks for onnx.
    step("download_onnx_v1_default_format", lambda: file_info(registry.download(
        onnx_id, "1.0.0", os.path.join(out, "onnx_v1"))["model_path"]))
    step("download_pkl_sklearn", lambda: file_info(registry.download(
        pkl_id, "1.0.0", os.path.join(out, "pkl_sklearn"), format="sklearn")["model_path"]))
    step("download_pkl_original", lambda: file_info(registry.download(
        pkl_id, "1.0.0", os.path.join(out, "pkl_original"), format="original")["model_path"]))
    # Informational: needs the sklearn -> ONNX conversion (asynchronous; the SDK does not retry).
    step("download_pkl_onnx", lambda: file_info(registry.download(
        pkl_id, "1.0.0", os.path.join(out, "pkl_onnx"), format="onnx")["model_path"]))

    # 5. FederatedClient.pull_model: GET /models?org_id=default (name -> id), GET .../versions/latest
    # when no version is given, then GET .../versions/{v}/download?format=F with the key; returns bytes.
    step("pull_onnx_by_name", lambda: bytes_info(client.pull_model(names["onnx"], format="onnx")))
    step("pull_onnx_by_id_label", lambda: bytes_info(client.pull_model(onnx_id, version="1.0.0", format="onnx")))
    step("pull_pkl_by_name_label", lambda: bytes_info(client.pull_model(names["pkl"], version="1.0.0",
                                                                        format="sklearn")))
    step("pull_pkl_original", lambda: bytes_info(client.pull_model(pkl_id, format="original")))
    # Informational: the SDK's default format is pytorch, which these models do not have.
    step("pull_onnx_default_format", lambda: bytes_info(client.pull_model(names["onnx"])))

    life_id = lifecycle(registry, client, cfg, token)
    print(json.dumps({"steps": STEPS, "trace": TRACE, "ids": {"onnx": onnx_id, "pkl": pkl_id, "life": life_id}}))


def lifecycle(registry: ModelRegistry, client: FederatedClient, cfg: dict[str, Any], token: Callable[[], str]) -> str:
    """Version lifecycle, metrics, create_version, architecture, federations, events: a model of its own."""
    import octomil
    from octomil.python.octomil.edge import Octomil
    from octomil.python.octomil.federation import Federation

    names, out, api_base = cfg["names"], cfg["out_dir"], cfg["api_base"]
    life = step("ensure_life", lambda: registry.ensure_model(name=names["life"], framework="sklearn",
                                                             use_case="regression"))
    life_id = life["id"] if isinstance(life, dict) else names["life"]
    v1 = step("upload_life_v1", lambda: registry.upload_version_from_path(
        life_id, cfg["onnx_v1"], version="1.0.0", architecture="mlp", input_dim=3, hidden_dim=8, output_dim=1))
    step("upload_life_v2", lambda: registry.upload_version_from_path(life_id, cfg["onnx_v2"], version="2.0.0"))
    v1 = v1 or {}
    # create_version: register bytes already in the store (v1's blob) as a new, draft version.
    step("create_version_bad_checksum", lambda: registry.create_version(
        life_id, "2.1.0", storage_path=v1.get("model_path", ""), fmt="onnx", checksum="sha256:" + "0" * 64,
        size_bytes=v1.get("model_size_bytes", 0)))
    step("create_version", lambda: registry.create_version(
        life_id, "2.1.0", storage_path=v1.get("model_path", ""), fmt="onnx", checksum=v1.get("model_hash", ""),
        size_bytes=v1.get("model_size_bytes", 0), description="v1 re-registered", metrics={"rmse": 0.25}))
    step("list_versions", lambda: registry.list_versions(life_id))
    step("list_versions_draft", lambda: registry.list_versions(life_id, status_filter="draft"))
    step("list_versions_page", lambda: registry.list_versions(life_id, limit=1, offset=1))
    step("latest_while_draft", lambda: registry.get_latest_version(life_id))
    step("publish_version", lambda: registry.publish_version(life_id, "2.1.0"))
    step("publish_version_again", lambda: registry.publish_version(life_id, "2.1.0"))
    step("latest_after_publish", lambda: registry.get_latest_version(life_id))
    step("update_version_metrics", lambda: registry.update_version_metrics(
        life_id, "2.1.0", {"rmse": 0.2, "mae": 0.1}))
    step("get_version", lambda: registry.get_version(life_id, "2.1.0"))
    step("deprecate_version", lambda: registry.deprecate_version(life_id, "2.1.0"))
    step("deprecate_version_again", lambda: registry.deprecate_version(life_id, "2.1.0"))
    step("latest_after_deprecate", lambda: registry.get_latest_version(life_id))
    step("download_deprecated", lambda: file_info(registry.download(
        life_id, "2.1.0", os.path.join(out, "life_deprecated"), format="onnx")["model_path"]))
    step("get_model_architecture", lambda: client.get_model_architecture(names["life"]))

    # Federation(...) and Octomil(...) find or create their federation when constructed.
    fed = step("federation_construct", lambda: Federation(token, name=names["fed"], api_base=api_base))
    step("federation_construct_again", lambda: Federation(token, name=names["fed"], api_base=api_base).federation_id)
    fed_id = fed.federation_id if fed else "none"
    STEPS["federation_construct"]["value"] = fed_id
    step("federation_attach_model", lambda: fed.api.post(f"/federations/{fed_id}/models", {"model_id": life_id}))
    step("federation_models", lambda: fed.api.get(f"/federations/{fed_id}/models"))
    step("federation_invite", lambda: fed.invite(["another-org"]))
    step("federation_analytics", lambda: fed.analytics.descriptive("age"))
    step("federation_deploy", lambda: fed.deploy(model_id=life_id, version="2.0.0"))
    octo = step("octomil_construct", lambda: Octomil(token, api_base=api_base))
    STEPS["octomil_construct"]["value"] = octo.federation.federation_id if octo else None
    step("octomil_registry_list_versions", lambda: octo.registry.list_versions(life_id))

    # optimize, compatibility, device config; the quantized variants download like any format.
    step("optimize", lambda: registry.optimize(life_id, accuracy_threshold=0.5, target_devices=["pixel_8"]))
    step("download_fp16", lambda: file_info(registry.download(
        life_id, "2", os.path.join(out, "life_fp16"), format="onnx-fp16")["model_path"]))
    step("check_compatibility", lambda: registry.check_compatibility(life_id, ["pixel_8", "iphone_15"]))
    step("get_device_config", lambda: registry.get_device_config(life_id, "pixel_8"))
    step("download_for_device", lambda: file_info(registry.download(
        life_id, "2", os.path.join(out, "life_device"), device_type="pixel_8")["model_path"]))

    # Telemetry and inference events, counted per model.
    step("init", lambda: octomil.init(api_key=token(), api_base=api_base))

    def telemetry() -> None:
        reporter = octomil.get_reporter()
        reporter.report_inference_started(model_id=life_id, version="2.0.0", session_id="s1")
        reporter.report_inference_completed(session_id="s1", model_id=life_id, version="2.0.0", total_chunks=1,
                                            total_duration_ms=5.0, ttfc_ms=1.0, throughput=1.0)
        reporter.close()

    step("telemetry_events", telemetry)
    step("inference_generate", lambda: [c.data.decode() for c in client.inference.generate(life_id, prompt="hi")])
    step("get_model_events", lambda: registry.get_model(life_id))
    return life_id


if __name__ == "__main__":
    main()
