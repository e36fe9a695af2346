// The octomil-lite web page: plain JavaScript, no build step, and every request goes to this registry.
"use strict";

const API = "/api/v1";
const KEY_STORE = "octomil-lite.api-key";
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (selector, root = document) => root.querySelector(selector);
const view = () => $("#view");
let renderId = 0;           // a slower, older render never replaces a newer one
let editUnsupported = false; // set once PATCH answers 405

// ---------- small helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

const dash = "—";
const isNumber = (x) => typeof x === "number" && Number.isFinite(x);
const formatNumber = (x) => (isNumber(x) ? String(Number(x.toPrecision(4))) : dash);
const clip = (text, n) => (text.length > n ? `${text.slice(0, n - 1)}…` : text);

function formatBytes(n) {
  if (!isNumber(n)) return dash;
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function timeCell(iso) {
  if (!iso) return dash;
  const date = new Date(iso);
  return el("time", { datetime: iso, title: iso }, Number.isNaN(date.getTime()) ? iso : date.toLocaleString());
}

function notice(text, isError = false) {
  const box = $("#notice");
  box.textContent = text || "";
  box.className = isError ? "error" : "";
}

function fromTemplate(id) {
  return $(`#${id}`).content.firstElementChild.cloneNode(true);
}

function show(node, id) {
  if (id !== renderId) return false;
  view().replaceChildren(node);
  const heading = $("h1", node);
  if (heading) heading.focus(); // keyboard and screen-reader users land on the new page's title
  return true;
}

// ---------- talking to the registry ----------

const apiKey = () => sessionStorage.getItem(KEY_STORE);

class ApiError extends Error {
  constructor(status, message, retryAfter = null) { super(message); this.status = status; this.retryAfter = retryAfter; }
}

async function errorFrom(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  try { message = (await resp.json()).message || message; } catch { /* not JSON: keep the status line */ }
  return new ApiError(resp.status, message, resp.headers.get("Retry-After"));
}

async function request(path, options = {}) {
  const headers = { Authorization: `Bearer ${apiKey()}`, ...(options.headers || {}) };
  let resp;
  try {
    resp = await fetch(API + path, { ...options, headers });
  } catch {
    throw new ApiError(0, "Cannot reach the registry. Is octomil-lite serve still running?");
  }
  if (resp.status === 401) {
    signOut("Your API key is no longer accepted. Sign in again.");
    throw new ApiError(401, "Signed out.");
  }
  if (!resp.ok) throw await errorFrom(resp);
  return resp;
}

const getJson = async (path) => (await request(path)).json();

function sendJson(path, method, body) {
  return request(path, { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

// ---------- sign in and out ----------

function showSignIn(message = "") {
  $("#sign-out").hidden = true;
  const node = fromTemplate("sign-in-view");
  const form = $("#sign-in-form", node);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = form.key.value.trim();
    const error = $("#sign-in-error", form);
    error.textContent = "";
    let resp;
    try {
      resp = await fetch(`${API}/models?limit=1`, { headers: { Authorization: `Bearer ${key}` } });
    } catch {
      error.textContent = "Cannot reach the registry. Is octomil-lite serve still running?";
      return;
    }
    if (resp.status === 401) {
      error.textContent = "That API key was not accepted. Check for a typo, or create a key on the server.";
    } else if (!resp.ok) {
      error.textContent = (await errorFrom(resp)).message;
    } else {
      sessionStorage.setItem(KEY_STORE, key);
      notice("");
      route();
    }
  });
  renderId += 1;
  show(node, renderId);
  notice(message);
}

function signOut(message = "Signed out.") {
  sessionStorage.removeItem(KEY_STORE);
  if (location.hash && location.hash !== "#/") history.replaceState(null, "", "#/");
  showSignIn(message);
}

// ---------- the models list ----------

const LIST_PARAMS = ["framework", "is_baseline", "limit", "offset"];

function listHash(params) {
  const query = new URLSearchParams();
  for (const name of LIST_PARAMS) if (params.get(name)) query.set(name, params.get(name));
  if (query.get("offset") === "0") query.delete("offset");
  const text = query.toString();
  return text ? `#/?${text}` : "#/";
}

async function showList(params, id) {
  const node = fromTemplate("list-view");
  const form = $("#filters", node);
  const limit = Number(params.get("limit")) || 20;
  const offset = Number(params.get("offset")) || 0;
  form.framework.value = params.get("framework") || "";
  form.is_baseline.value = params.get("is_baseline") || "";
  form.limit.value = String(limit);
  form.addEventListener("change", (event) => {
    if (event.target === form.search) return;
    const next = new URLSearchParams(new FormData(form));
    next.delete("search");
    location.hash = listHash(next);
  });
  form.addEventListener("submit", (event) => event.preventDefault());

  const query = new URLSearchParams({ limit, offset });
  if (params.get("framework")) query.set("framework", params.get("framework"));
  if (params.get("is_baseline")) query.set("is_baseline", params.get("is_baseline"));
  const page = await getJson(`/models?${query}`);

  const rows = page.models.map((m) => el("tr", { "data-search": `${m.description || ""} ${m.id}`.toLowerCase() },
    el("td", { "data-label": "Model" },
      el("a", { href: `#/models/${encodeURIComponent(m.id)}` }, clip(m.description || "Untitled model", 120)),
      el("div", { class: "hint mono" }, m.id)),
    el("td", { "data-label": "Framework" }, [m.framework, m.framework_version].filter(Boolean).join(" ") || dash),
    el("td", { "data-label": "Baseline" }, m.is_baseline ? el("span", { class: "badge" }, "baseline") : "no"),
    el("td", { "data-label": "Accuracy", class: "num" }, formatNumber(m.accuracy)),
    el("td", { "data-label": "Loss", class: "num" }, formatNumber(m.loss)),
    el("td", { "data-label": "Size", class: "num" }, formatBytes(m.model_size_bytes)),
    el("td", { "data-label": "Created" }, timeCell(m.created_at))));
  $("#models tbody", node).replaceChildren(...rows);

  const summary = $("#list-summary", node);
  const first = page.total ? page.offset + 1 : 0;
  const last = page.offset + page.models.length;
  const filtered = params.get("framework") || params.get("is_baseline");
  const counted = page.total
    ? `Models ${first}–${last} of ${page.total}, newest first.`
    : filtered ? "No models match these filters." : "No models yet: create one below or with the API.";
  summary.textContent = counted;

  const search = form.search;
  search.addEventListener("input", () => {
    const text = search.value.trim().toLowerCase();
    let shown = 0;
    for (const row of rows) {
      row.hidden = Boolean(text) && !row.dataset.search.includes(text);
      if (!row.hidden) shown += 1;
    }
    summary.textContent = text ? `${counted} ${shown} on this page match “${search.value.trim()}”.` : counted;
  });

  pageLink($("#prev", node), offset > 0, params, Math.max(0, offset - limit));
  pageLink($("#next", node), offset + limit < page.total, params, offset + limit);
  $("#create-form", node).addEventListener("submit", createModel);
  show(node, id);
}

function pageLink(link, enabled, params, offset) {
  if (!enabled) {
    link.setAttribute("aria-disabled", "true");
    return;
  }
  const next = new URLSearchParams(params);
  next.set("offset", String(offset));
  link.href = listHash(next);
}

async function createModel(event) {
  event.preventDefault();
  const form = event.target;
  const error = $(".error", form);
  error.textContent = "";
  const body = { is_baseline: form.is_baseline.checked };
  for (const name of ["framework", "framework_version", "description"]) {
    if (form[name].value.trim()) body[name] = form[name].value.trim();
  }
  try {
    const model = await (await sendJson("/models", "POST", body)).json();
    location.hash = `#/models/${encodeURIComponent(model.id)}`;
  } catch (e) {
    error.textContent = e.message;
  }
}

// ---------- one model ----------

async function showModel(modelId, id) {
  const path = `/models/${encodeURIComponent(modelId)}`;
  const model = await getJson(path);
  const node = fromTemplate("model-view");
  $("#model-title", node).textContent = clip(model.description || "Untitled model", 80);

  const meta = [
    ["ID", el("span", { class: "mono" }, model.id)],
    ["Description", model.description || dash],
    ["Framework", [model.framework, model.framework_version].filter(Boolean).join(" ") || dash],
    ["Baseline", model.is_baseline ? "yes" : "no"],
    ["Accuracy", formatNumber(model.accuracy)],
    ["Loss", formatNumber(model.loss)],
    ["Round", model.round_id || dash],
    ["Created", timeCell(model.created_at)],
    ["Newest version", model.model_hash
      ? `${formatBytes(model.model_size_bytes)}, ${model.model_hash}` : "none uploaded"],
  ];
  $("#model-meta", node).replaceChildren(...meta.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));

  setUpEdit($("#edit", node), model, path);
  const versions = [...model.versions].reverse();
  drawCharts($("#chart", node), model.versions);
  const rows = versions.map((v) => versionRow(model, v));
  $("#versions tbody", node).replaceChildren(...rows.map((r) => r.row));
  $("#no-versions", node).hidden = versions.length > 0;
  setUpUpload($("#upload-form", node), path);
  if (!show(node, id)) return;
  await Promise.all(rows.map((r) => r.loadFormats()));
}

function setUpEdit(section, model, path) {
  if (editUnsupported) {
    section.remove();
    return;
  }
  const form = $("#edit-form", section);
  form.description.value = model.description || "";
  form.accuracy.value = isNumber(model.accuracy) ? model.accuracy : "";
  form.loss.value = isNumber(model.loss) ? model.loss : "";
  form.is_baseline.checked = model.is_baseline;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const error = $(".error", form);
    error.textContent = "";
    const number = (input) => (input.value.trim() === "" ? null : Number(input.value));
    const body = {
      description: form.description.value.trim() || null,
      accuracy: number(form.accuracy),
      loss: number(form.loss),
      is_baseline: form.is_baseline.checked,
    };
    for (const name of Object.keys(body)) if (body[name] === model[name]) delete body[name];
    if (Object.keys(body).length === 0) {
      error.textContent = "Nothing changed.";
      return;
    }
    try {
      await sendJson(path, "PATCH", body);
      notice("Saved.");
      route();
    } catch (e) {
      if (e.status === 405) {
        editUnsupported = true;
        section.replaceWith(el("p", { class: "hint" }, "This registry does not support editing models yet."));
      } else {
        error.textContent = e.message;
      }
    }
  });
}

function versionRow(model, v) {
  const formats = el("ul", { class: "formats" }, el("li", {}, "Loading…"));
  const row = el("tr", {},
    el("th", { scope: "row", "data-label": "Version" }, `v${v.version}`,
      v.label ? el("div", { class: "hint" }, v.label) : null),
    el("td", { "data-label": "Format" }, v.format),
    el("td", { "data-label": "Size", class: "num" }, formatBytes(v.model_size_bytes)),
    el("td", { "data-label": "Hash" }, el("span", { class: "mono", title: v.model_hash }, shortHash(v.model_hash))),
    el("td", { "data-label": "Description" }, v.description || dash),
    el("td", { "data-label": "Uploaded" }, timeCell(v.uploaded_at)),
    el("td", { "data-label": "Accuracy", class: "num" }, formatNumber(v.accuracy)),
    el("td", { "data-label": "Loss", class: "num" }, formatNumber(v.loss)),
    el("td", { "data-label": "Formats" }, formats));

  let polls = 0;
  async function loadFormats() {
    const items = [el("li", {}, downloadButton(model.id, v.version, "original", `${v.format} (original)`))];
    let detail = null;
    try {
      detail = await getJson(`/models/${encodeURIComponent(model.id)}/versions/${v.version}`);
    } catch (e) {
      // A registry without the version-detail endpoint still serves the original.
      if (e.status !== 404 && e.status !== 405) items.push(el("li", { class: "error" }, e.message));
    }
    const entries = Object.entries((detail && detail.formats) || {})
      .filter(([format]) => format !== "original" && format !== v.format);
    for (const [format, info] of entries) {
      items.push(el("li", {}, formatItem(model.id, v.version, format, info || {}, loadFormats)));
    }
    formats.replaceChildren(...items);
    const busy = entries.some(([, info]) => info && (info.status === "pending" || info.status === "running"));
    polls = busy ? polls + 1 : 0;
    if (busy && polls < 60) setTimeout(() => { if (row.isConnected) loadFormats(); }, 3000);
  }
  return { row, loadFormats };
}

const shortHash = (hash) => (hash ? `${hash.slice(0, 15)}…` : dash);

function formatItem(modelId, version, format, info, refresh) {
  const status = info.status || "unknown";
  if (status === "ready") {
    const parity = info.parity && isNumber(info.parity.max_abs_diff)
      ? el("span", { class: info.parity.within === false ? "badge bad" : "badge ok" },
        `parity max |Δ| ${info.parity.max_abs_diff.toExponential(1)}${info.parity.within === false ? " (outside tolerance)" : ""}`)
      : null;
    return el("span", {}, downloadButton(modelId, version, format, format), " ", parity);
  }
  if (status === "on_request") {
    // The first download request starts the conversion; then the row polls until it is ready.
    return el("button", {
      type: "button", class: "link", "aria-label": `Convert version ${version} to ${format}`,
      onclick: async (event) => { await download(modelId, version, format, event.currentTarget); refresh(); },
    }, `Convert to ${format}`);
  }
  const words = { pending: "waiting to convert", running: "converting…", failed: "conversion failed",
    impossible: "cannot be converted", unavailable: "converter not installed" };
  const cls = status === "pending" || status === "running" ? "badge" : "badge bad";
  return el("span", {}, el("span", { class: cls }, `${format}: ${words[status] || status}`),
    info.reason ? el("span", { class: "hint" }, ` ${info.reason}`) : null);
}

function downloadButton(modelId, version, format, label) {
  return el("button", {
    type: "button", class: "link",
    "aria-label": `Download version ${version} as ${label}`,
    onclick: (event) => download(modelId, version, format, event.currentTarget),
  }, `Download ${label}`);
}

async function download(modelId, version, format, button) {
  button.disabled = true;
  notice(`Downloading version ${version} (${format})…`);
  try {
    const resp = await request(`/models/${encodeURIComponent(modelId)}/versions/${version}/download?format=${format}`);
    const disposition = resp.headers.get("Content-Disposition") || "";
    const match = /filename="?([^";]+)"?/.exec(disposition);
    const name = match ? match[1] : `model_v${version}`;
    const url = URL.createObjectURL(await resp.blob());
    const link = el("a", { href: url, download: name, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    notice(`Downloaded ${name}.`);
  } catch (e) {
    notice(e.message, !e.retryAfter); // "being converted, retry in N s" is news, not an error
  } finally {
    button.disabled = false;
  }
}

// ---------- upload ----------

function setUpUpload(form, path) {
  const box = $(".progress", form);
  const bar = $("progress", form);
  const text = $("#u-progress-text", form);
  const error = $(".error", form);
  const submit = $("button[type=submit]", form);
  const cancel = $("#u-cancel", form);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    error.textContent = "";
    const data = new FormData();
    for (const name of ["format", "description", "input_shape", "round_id", "accuracy", "loss"]) {
      const value = form[name].value.trim();
      if (value) data.append(name, value);
    }
    data.append("file", form.file.files[0]);

    const xhr = new XMLHttpRequest();
    xhr.open("POST", `${API}${path}/versions/upload`);
    xhr.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
    xhr.upload.addEventListener("progress", (e) => {
      if (!e.lengthComputable) return;
      bar.max = e.total;
      bar.value = e.loaded;
      text.textContent = `${Math.floor((100 * e.loaded) / e.total)} % of ${formatBytes(e.total)}`;
    });
    const done = () => { submit.disabled = false; cancel.hidden = true; };
    xhr.addEventListener("load", () => {
      done();
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      if (xhr.status === 201) {
        notice(`Uploaded version ${body.version} (${body.format}, ${formatBytes(body.model_size_bytes)}).`);
        route();
      } else if (xhr.status === 401) {
        signOut("Your API key is no longer accepted. Sign in again.");
      } else {
        box.hidden = true;
        error.textContent = body.message || `Upload failed: ${xhr.status} ${xhr.statusText}`;
      }
    });
    xhr.addEventListener("error", () => { done(); error.textContent = "The upload failed: the registry could not be reached."; });
    xhr.addEventListener("abort", () => { done(); box.hidden = true; notice("Upload cancelled."); });
    cancel.onclick = () => xhr.abort();

    submit.disabled = true;
    cancel.hidden = false;
    box.hidden = false;
    bar.value = 0;
    text.textContent = "Starting…";
    xhr.send(data);
  });
}

// ---------- accuracy and loss chart (inline SVG) ----------

function drawCharts(section, versions) {
  const panels = [["accuracy", "Accuracy"], ["loss", "Loss"]]
    .map(([field, label]) => [field, label, versions.filter((v) => isNumber(v[field])).map((v) => [v.version, v[field]])])
    .filter(([, , points]) => points.length > 0)
    .map(([field, label, points]) => lineChart(field, label, points));
  if (panels.length === 0) return;
  $(".charts", section).replaceChildren(...panels);
  section.hidden = false;
}

function lineChart(field, label, points) {
  const W = 360, H = 200, left = 48, right = 12, top = 16, bottom = 32;
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const pad = y1 > y0 ? (y1 - y0) * 0.1 : Math.abs(y0) * 0.1 || 1;
  [y0, y1] = [y0 - pad, y1 + pad];
  const sx = (x) => (x1 === x0 ? (left + W - right) / 2 : left + ((x - x0) / (x1 - x0)) * (W - left - right));
  const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (H - top - bottom);

  const titleId = `chart-${field}-title`;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: `chart ${field}`, role: "img", "aria-labelledby": titleId });
  const summary = points.map(([x, y]) => `v${x}: ${formatNumber(y)}`).join(", ");
  chart.append(svg("title", { id: titleId }, `${label} by version: ${summary}`));
  chart.append(svg("line", { x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, class: "axis" }));
  chart.append(svg("line", { x1: left, y1: top, x2: left, y2: H - bottom, class: "axis" }));
  for (const y of [y0 + pad, (y0 + y1) / 2, y1 - pad]) {
    chart.append(svg("line", { x1: left, y1: sy(y), x2: W - right, y2: sy(y), class: "grid" }));
    chart.append(svg("text", { x: left - 6, y: sy(y) + 4, "text-anchor": "end" }, formatNumber(y)));
  }
  const step = Math.max(1, Math.ceil(xs.length / 8));
  xs.forEach((x, i) => {
    if (i % step === 0 || i === xs.length - 1) {
      chart.append(svg("text", { x: sx(x), y: H - bottom + 18, "text-anchor": "middle" }, `v${x}`));
    }
  });
  chart.append(svg("polyline", { points: points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "), class: "line" }));
  for (const [x, y] of points) {
    chart.append(svg("circle", { cx: sx(x), cy: sy(y), r: 4, class: "dot" }, svg("title", {}, `v${x}: ${formatNumber(y)}`)));
  }
  return el("figure", {}, chart, el("figcaption", {}, label));
}

// ---------- routing: #/ is the list, #/models/<id> one model ----------

async function route() {
  if (!apiKey()) {
    showSignIn();
    return;
  }
  $("#sign-out").hidden = false;
  renderId += 1;
  const id = renderId;
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const match = /^\/models\/([^/]+)$/.exec(path);
  try {
    if (match) await showModel(decodeURIComponent(match[1]), id);
    else await showList(new URLSearchParams(query), id);
  } catch (e) {
    if (e.status === 401 || id !== renderId) return;
    const back = el("p", {}, el("a", { href: "#/" }, "← All models"));
    show(el("section", {}, el("h1", { tabindex: "-1" }, e.status === 404 ? "Not found" : "Something went wrong"),
      el("p", { class: "error" }, e.message), back), id);
  }
}

$("#sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", () => { notice(""); route(); });
route();
