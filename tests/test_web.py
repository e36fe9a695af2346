"""The web page and API docs in headless Chromium against a real `octomil-lite serve`, with no outside request."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server, bearer

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Site:
    """The server under test, an admin key and an API client for setting up data."""

    def __init__(self, server: Server, key: str):
        self.server = server
        self.url = server.url
        self.key = key
        self.api = httpx.Client(base_url=f"{server.url}/api/v1", headers=bearer(key), timeout=30)

    def create_model(self, **body: Any) -> dict[str, Any]:
        resp = self.api.post("/models", json=body)
        assert resp.status_code == 201, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def upload(self, model_id: str, content: bytes, **fields: str) -> dict[str, Any]:
        resp = self.api.post(f"/models/{model_id}/versions/upload", files={"file": ("model.pkl", content)}, data=fields)
        assert resp.status_code == 201, resp.text
        return resp.json()  # type: ignore[no-any-return]


class Tab:
    """A fresh browser context and page that records the URL of every request it makes."""

    def __init__(self, browser: Any, site: Site, width: int = 1280):
        self.site = site
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(10_000)
        self.urls: list[str] = []
        self.page.on("request", lambda request: self.urls.append(request.url))

    def outside_requests(self) -> list[str]:
        local = (self.site.url + "/", f"blob:{self.site.url}/", "data:")
        return [url for url in self.urls if not url.startswith(local)]

    def sign_in(self, key: str | None = None) -> None:
        self.page.goto(self.site.url + "/")
        self.page.get_by_label("API key").fill(key or self.site.key)
        self.page.keyboard.press("Enter")

    def open_model(self, model_id: str) -> None:
        self.page.goto(f"{self.site.url}/#/models/{model_id}")
        self.page.locator("#versions").wait_for()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    server = Server(tmp_path_factory.mktemp("web") / "data")
    try:
        key = subprocess.run(
            [sys.executable, "-m", "octomil_lite.cli", "keys", "create", "--name", "web", "--scope", "admin"],
            capture_output=True, text=True, check=True, env={**os.environ, "OCTOMIL_LITE_HOME": str(server.data_dir)},
        ).stdout.strip()
        site = Site(server, key)
        yield site
        site.api.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("needs Chromium at /usr/bin/chromium (apt-get install chromium)")
    if sync_playwright is None:
        pytest.skip("needs playwright (pip install playwright)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def tab(browser: Any, site: Site) -> Iterator[Tab]:
    tab = Tab(browser, site)
    yield tab
    tab.context.close()


OUTSIDE_URL = re.compile(r"""(?:src|href)=["']?(?:https?:)?//""")


def test_page_and_docs_html_name_only_assets_served_from_the_package(site: Site) -> None:
    page = httpx.get(site.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    docs = httpx.get(site.url + "/schema")
    assert docs.status_code == 200 and "SwaggerUIBundle" in docs.text
    for html in (page.text, docs.text):
        assert OUTSIDE_URL.findall(html) == [] and "fonts.googleapis" not in html
        for asset in re.findall(r"""(?:src|href)=["'](/static/[^"']+)""", html):
            assert httpx.get(site.url + asset).status_code == 200, asset
    assert httpx.get(site.url + "/schema/openapi.json").json()["info"]["title"] == "octomil-lite"


HOSTED_OPERATIONS = {("get", "/api/v1/models"), ("post", "/api/v1/models"), ("get", "/api/v1/models/{model_id}"),
                     ("post", "/api/v1/models/{model_id}/versions/upload"),
                     ("get", "/api/v1/models/{model_id}/versions/{version}/download")}


def test_api_docs_group_operations_by_tag_each_summarised_with_the_hosted_ones_marked(site: Site) -> None:
    doc = httpx.get(site.url + "/schema/openapi.json").json()
    assert [t["name"] for t in doc["tags"]] == ["models", "versions", "downloads", "keys-health", "federated-learning"]
    assert all(t["description"] for t in doc["tags"])
    assert "[Back to the web page](/)" in doc["info"]["description"]
    operations = {(method, path): op for path, ops in doc["paths"].items() for method, op in ops.items()}
    for (method, path), op in operations.items():
        assert len(op["tags"]) == 1 and op["tags"][0] in {t["name"] for t in doc["tags"]}, (method, path)
        assert op["summary"] and "\n" not in op["summary"] and op["description"], (method, path)
        hosted = (method, path) in HOSTED_OPERATIONS
        assert op["summary"].endswith("(hosted API)") == hosted, (method, path)
        assert op["description"].startswith("Part of the hosted Octomil Models API") == hosted, (method, path)
    assert {op["tags"][0] for op in operations.values()} == {"models", "versions", "downloads", "keys-health",
                                                           "federated-learning"}


def test_wrong_key_is_refused_with_a_clear_message(tab: Tab) -> None:
    tab.sign_in("oml_not-a-real-key")
    expect(tab.page.locator("#sign-in-error")).to_contain_text("not accepted")
    assert tab.page.evaluate("sessionStorage.length") == 0
    assert tab.outside_requests() == []


def test_sign_in_lists_a_model_made_through_the_api_and_filters_it(tab: Tab, site: Site) -> None:
    site.create_model(framework="sklearn", description="Iris classifier for the web page", is_baseline=True)
    xgb = site.create_model(framework="xgboost", description="Churn predictor", framework_version="2.1.0")
    tab.sign_in()
    rows = tab.page.locator("#models tbody tr")
    rows.filter(has_text="Iris classifier for the web page").wait_for()
    assert "oml_" not in tab.page.url and tab.context.cookies() == []
    assert tab.page.evaluate("sessionStorage.getItem('octomil-lite.api-key')") == site.key

    tab.page.locator("#f-framework").select_option("xgboost")
    tab.page.wait_for_url(re.compile(r"framework=xgboost"))
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Churn predictor")
    expect(rows.first).to_contain_text("xgboost 2.1.0")

    tab.page.locator("#f-framework").select_option("")
    rows.filter(has_text="Iris classifier").wait_for()
    tab.page.get_by_label("Search descriptions").fill("churn")
    expect(rows.filter(visible=True)).to_have_count(1)

    tab.page.get_by_role("link", name="Churn predictor").focus()
    tab.page.keyboard.press("Enter")
    tab.page.get_by_role("heading", name="Churn predictor").wait_for()
    assert xgb["id"] in tab.page.locator("#model-meta").inner_text()
    assert tab.outside_requests() == []


def test_model_page_shows_versions_and_downloads_with_the_servers_file_name(
        tab: Tab, site: Site, sklearn_pickle: bytes) -> None:
    model = site.create_model(framework="sklearn", description="Downloadable")
    site.upload(model["id"], sklearn_pickle, description="first cut")
    tab.sign_in()
    tab.page.locator("#models").wait_for()
    tab.open_model(model["id"])
    row = tab.page.locator("#versions tbody tr").first
    assert "v1" in row.inner_text() and "first cut" in row.inner_text() and "sklearn" in row.inner_text()

    with tab.page.expect_download() as info:
        row.get_by_role("button", name="Download version 1 as sklearn (original)").click()
    download = info.value
    assert download.suggested_filename == "model_v1.pkl"
    assert Path(download.path()).read_bytes() == sklearn_pickle

    # The row polls the version's format statuses until the ONNX conversion is ready, then offers it too.
    onnx = row.get_by_role("button", name="Download version 1 as onnx")
    onnx.wait_for(timeout=90_000)
    with tab.page.expect_download() as info:
        onnx.click()
    assert info.value.suggested_filename == "model_v1.onnx"
    assert tab.outside_requests() == []


def test_formats_that_cannot_be_made_show_why_and_offer_no_convert_button(
        tab: Tab, site: Site, sklearn_pickle: bytes) -> None:
    model = site.create_model(framework="sklearn", description="Estimator")
    site.upload(model["id"], sklearn_pickle)
    tab.sign_in()
    tab.page.locator("#models").wait_for()
    tab.open_model(model["id"])
    row = tab.page.locator("#versions tbody tr").first
    for target in ("tflite", "coreml"):
        expect(row).to_contain_text(f"{target}: cannot be converted")
        assert row.get_by_role("button", name=f"Convert version 1 to {target}").count() == 0
    expect(row).to_contain_text("convert to ONNX only")
    assert tab.outside_requests() == []


def test_upload_form_adds_a_version_with_progress(tab: Tab, site: Site, sklearn_pickle: bytes) -> None:
    model = site.create_model(framework="sklearn", description="Uploaded from the page")
    tab.sign_in()
    tab.page.locator("#models").wait_for()
    tab.open_model(model["id"])
    page = tab.page
    page.get_by_label("Model file").set_input_files(
        {"name": "clf.pkl", "mimeType": "application/octet-stream", "buffer": sklearn_pickle})
    page.locator("#u-description").fill("from the browser")
    page.locator("#u-accuracy").fill("0.91")
    page.locator("#u-loss").fill("0.2")
    page.get_by_role("button", name="Upload", exact=True).click()
    page.get_by_text("Uploaded version 1").wait_for()
    page.locator("#versions tbody tr", has_text="from the browser").wait_for()

    version = site.api.get(f"/models/{model['id']}").json()["versions"][0]
    assert version["description"] == "from the browser" and version["model_size_bytes"] == len(sklearn_pickle)
    if version.get("accuracy") == 0.91:
        assert page.locator("#chart svg.accuracy circle").count() == 1
        assert page.locator("#chart svg.loss circle").count() == 1
    assert tab.outside_requests() == []


def test_per_version_metrics_are_charted_and_statuses_shown(tab: Tab, site: Site, sklearn_pickle: bytes) -> None:
    model = site.create_model(framework="sklearn", description="Charted")
    for label, f1 in (("1.0.0", 0.8), ("1.1.0", 0.9)):
        resp = site.api.post(f"/models/{model['id']}/versions/upload", data={"version": label},
                             files={"file": ("m.pkl", sklearn_pickle)})
        assert resp.status_code == 201, resp.text
        site.api.patch(f"/models/{model['id']}/versions/{label}/metrics", json={"metrics": {"f1": f1, "p@5": 1}})
    site.api.post(f"/models/{model['id']}/versions/1.0.0/deprecate", json={})
    tab.sign_in()
    tab.page.locator("#models").wait_for()
    tab.open_model(model["id"])
    page = tab.page
    page.locator('#chart figure[data-metric="f1"] circle').nth(1).wait_for()
    assert page.locator('#chart figure[data-metric="f1"] circle').count() == 2
    assert page.locator('#chart figure[data-metric="p@5"] circle').count() == 2
    assert page.locator("#chart svg.accuracy").count() == 0
    assert page.locator("#versions tbody tr", has_text="1.0.0").locator(".status.deprecated").count() == 1
    assert tab.outside_requests() == []


def test_edit_form_saves_description_and_metrics(tab: Tab, site: Site) -> None:
    model = site.create_model(framework="pytorch", description="Before edit")
    editable = site.api.patch(f"/models/{model['id']}", json={}).status_code != 405
    tab.sign_in()
    tab.page.locator("#models").wait_for()
    tab.open_model(model["id"])
    page = tab.page
    page.get_by_text("Edit description and metrics").click()
    page.locator("#e-description").fill("After edit")
    page.locator("#e-accuracy").fill("0.75")
    page.get_by_role("button", name="Save").click()
    if not editable:
        page.get_by_text("does not support editing").wait_for()
        pytest.skip("this registry has no PATCH /api/v1/models/{id} yet")
    page.get_by_role("heading", name="After edit").wait_for()
    saved = site.api.get(f"/models/{model['id']}").json()
    assert saved["description"] == "After edit" and saved["accuracy"] == 0.75
    assert tab.outside_requests() == []


def test_sign_out_forgets_the_key(tab: Tab) -> None:
    tab.sign_in()
    tab.page.get_by_role("button", name="Sign out").click()
    tab.page.get_by_label("API key").wait_for()
    assert tab.page.evaluate("sessionStorage.length") == 0
    tab.page.reload()
    tab.page.get_by_label("API key").wait_for()


def test_narrow_screen_has_no_sideways_scroll_and_every_field_is_labelled(
        browser: Any, site: Site, sklearn_pickle: bytes) -> None:
    model = site.create_model(framework="sklearn", description="Narrow")
    site.upload(model["id"], sklearn_pickle)
    tab = Tab(browser, site, width=380)
    try:
        tab.sign_in()
        tab.page.locator("#models").wait_for()
        tab.open_model(model["id"])
        assert tab.page.evaluate("document.documentElement.scrollWidth") <= 380
        unlabelled = tab.page.evaluate(
            "[...document.querySelectorAll('input, select, textarea')].filter(e => !e.labels.length).map(e => e.id)")
        assert unlabelled == []
        assert tab.outside_requests() == []
    finally:
        tab.context.close()


def test_api_docs_render_from_the_package_with_no_outside_request(tab: Tab, site: Site) -> None:
    page = tab.page
    page.goto(site.url + "/schema")
    page.locator(".swagger-ui .info .title", has_text="octomil-lite").wait_for()
    page.locator(".opblock", has_text="/api/v1/models/{model_id}/versions/upload").first.wait_for()

    page.get_by_role("button", name="Authorize").first.click()  # the docs can call the API with a key
    page.locator(".modal-ux input").fill(site.key)
    page.locator(".modal-ux button.authorize").click()
    page.locator(".modal-ux button.btn-done").click()
    operation = page.locator("#operations-models-ApiV1ModelsListModels")
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.get_by_role("button", name="Execute").click()
    expect(operation.locator(".live-responses-table tbody .response-col_status").first).to_have_text("200")
    assert tab.outside_requests() == []
    assert any(url.endswith("/static/vendor/swagger-ui-bundle.js") for url in tab.urls)


def test_model_page_shows_training_rounds_with_a_chart_across_rounds(tab: Tab, site: Site) -> None:
    import base64
    import io

    import numpy as np

    def npz(value: float) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, w=np.full(3, value, dtype=np.float32))
        return buf.getvalue()

    model = site.create_model(framework="pytorch", description="Federated")
    resp = site.api.post(f"/models/{model['id']}/versions/upload", files={"file": ("base.npz", npz(0.0))})
    assert resp.status_code == 201, resp.text
    devices = [site.api.post("/devices/register", json={"device_identifier": f"web-{i}-{model['id']}"}).json()["id"]
               for i in range(2)]
    for number in (1, 2):
        opened = site.api.post("/training/rounds", json={"model_id": model["id"], "version": number}).json()
        for i, device_id in enumerate(devices):
            resp = site.api.post("/training/weights", json={
                "model_id": model["id"], "version": number, "device_id": device_id, "round_id": opened["round_id"],
                "sample_count": 10 * (i + 1), "metrics": {"loss": 1.0 / number + i}, "weights_data":
                base64.b64encode(npz(float(number + i))).decode()})
            assert resp.status_code == 200, resp.text
        assert site.api.post("/training/aggregate", json={"model_id": model["id"], "round_id": opened["round_id"],
                                                          "min_updates": 2}).status_code == 200
    tab.sign_in()
    tab.page.locator("#models").wait_for()
    tab.open_model(model["id"])
    rows = tab.page.locator("#rounds tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("completed")
    expect(rows.first).to_contain_text("2 → 3")
    expect(rows.first.locator("td[data-label=Participants]")).to_have_text("2")
    expect(rows.first.locator("td[data-label=Samples]")).to_have_text("30")
    expect(tab.page.locator("#rounds svg.round-loss circle")).to_have_count(2)
    assert "loss by round" in tab.page.locator("#rounds figcaption").first.text_content()
    assert tab.outside_requests() == []
