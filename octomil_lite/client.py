"""A synchronous Python client for the octomil-lite Models API (httpx)."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Self
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
CHUNK_BYTES = 1024 * 1024

Progress = Callable[[int, int], None]

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "payload_too_large", 416: "range_not_satisfiable", 429: "rate_limited",
          500: "internal_error", 507: "insufficient_storage"}


class OctomilLiteError(Exception):
    """Any failure of a client call: an error answer from the server, or no answer at all (status 0)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"OctomilLiteError({self.status}, {self.code!r}, {self.message!r})"


def _error_of(resp: httpx.Response) -> OctomilLiteError:
    """The OctomilLiteError an error response stands for (the body must already be read)."""
    code = _CODES.get(resp.status_code, "http_error")
    message = f"{resp.request.method} {resp.request.url.path} answered {resp.status_code} {resp.reason_phrase}."
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        code = str(body.get("error") or code)
        message = body["message"]
    return OctomilLiteError(resp.status_code, code, message)


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _quoted(text: str) -> str:
    # HTML's multipart encoding: percent-escape the three characters that would break the quoted string.
    return text.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


def _multipart_head(boundary: str, fields: dict[str, Any], filename: str) -> bytes:
    """A multipart/form-data body up to the file's bytes: the text fields, then the file part's header."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{_quoted(name)}"\r\n\r\n{_form_value(value)}\r\n'
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{_quoted(filename)}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n")
    return "".join(parts).encode()


def _filename_of(resp: httpx.Response, fallback: str) -> str:
    """The file name from Content-Disposition, reduced to a bare name (no directories)."""
    header = resp.headers.get("content-disposition", "")
    match = re.search(r'filename="([^"]+)"', header) or re.search(r"filename=([^;\s]+)", header)
    name = Path(match.group(1)).name if match else ""
    return name if name not in ("", ".", "..") else fallback


class Client:
    """Talk to an octomil-lite (or hosted Octomil) registry; every method raises OctomilLiteError on failure."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0):
        self.base_url = (base_url or os.environ.get("OCTOMIL_LITE_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("OCTOMIL_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=f"{self.base_url}/api/v1", headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable(self, exc: httpx.HTTPError) -> OctomilLiteError:
        return OctomilLiteError(0, "unreachable", f"Cannot reach octomil-lite at {self.base_url}: "
                                f"{exc or type(exc).__name__}.")

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if resp.status_code >= 400:
            raise _error_of(resp)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._request(method, path, **kwargs).json()  # type: ignore[no-any-return]

    @staticmethod
    def _model_path(model_id: str) -> str:
        return f"/models/{quote(model_id, safe='')}"

    def _version_path(self, model_id: str, version: int | str) -> str:
        return f"{self._model_path(model_id)}/versions/{quote(str(version), safe='')}"

    # models

    def list_models(self, framework: str | None = None, is_baseline: bool | None = None,
                    page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every matching model, newest first, fetched page by page."""
        params: dict[str, Any] = {"limit": page_size}
        if framework is not None:
            params["framework"] = framework
        if is_baseline is not None:
            params["is_baseline"] = "true" if is_baseline else "false"
        offset = 0
        while True:
            page = self._json("GET", "/models", params={**params, "offset": offset})
            yield from page["models"]
            offset += len(page["models"])
            if not page["models"] or offset >= page["total"]:
                return

    def get_model(self, model_id: str) -> dict[str, Any]:
        """One model with its versions (oldest first)."""
        return self._json("GET", self._model_path(model_id))

    def create_model(self, **fields: Any) -> dict[str, Any]:
        """Create a model from JSON fields (framework, framework_version, description, is_baseline, ...)."""
        return self._json("POST", "/models", json=fields)

    def update_model(self, model_id: str, **fields: Any) -> dict[str, Any]:
        """Change some of a model's fields (PATCH) and return the updated model."""
        return self._json("PATCH", self._model_path(model_id), json=fields)

    def delete_model(self, model_id: str) -> None:
        """Delete a model and all its versions."""
        self._request("DELETE", self._model_path(model_id))

    # versions

    def get_version(self, model_id: str, version: int | str) -> dict[str, Any]:
        """One version (a number, 'latest' or a label) with the status of each of its formats."""
        return self._json("GET", self._version_path(model_id, version))

    def delete_version(self, model_id: str, version: int | str) -> None:
        """Delete one version of a model."""
        self._request("DELETE", self._version_path(model_id, version))

    def upload_version(self, model_id: str, path: str | os.PathLike[str], format: str | None = None,
                       description: str | None = None, progress: Progress | None = None,
                       **fields: Any) -> dict[str, Any]:
        """Upload a file as the next version, streamed from disk; extra fields (round_id, ...) go in the form."""
        path = Path(path)
        fields = {"format": format, "description": description, **fields}
        boundary = secrets.token_hex(16)
        head = _multipart_head(boundary, {k: v for k, v in fields.items() if v is not None}, path.name)
        tail = f"\r\n--{boundary}--\r\n".encode()
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise OctomilLiteError(0, "file_error", f"Cannot read {path}: {exc.strerror}.") from None
        # An explicit Content-Length makes httpx send the generator as is, neither buffered nor chunked.
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
                   "Content-Length": str(len(head) + size + len(tail))}
        with open(path, "rb") as file:
            return self._json("POST", f"{self._model_path(model_id)}/versions/upload",
                              content=self._upload_body(file, size, head, tail, progress), headers=headers)

    @staticmethod
    def _upload_body(file: BinaryIO, size: int, head: bytes, tail: bytes,
                     progress: Progress | None) -> Iterator[bytes]:
        yield head
        done = 0
        if progress:
            progress(0, size)
        while done < size:
            chunk = file.read(min(CHUNK_BYTES, size - done))
            if not chunk:
                raise OctomilLiteError(0, "file_error", f"{file.name} shrank while it was being uploaded.")
            done += len(chunk)
            yield chunk
            if progress:
                progress(done, size)
        yield tail

    def download_version(self, model_id: str, version: int | str, dest: str | os.PathLike[str],
                         format: str | None = None, progress: Progress | None = None) -> Path:
        """Download a version to dest (a file, or a directory to use the server's file name); resumes a dest.part.

        The bytes go to dest + '.part' and are renamed into place only once their sha256 matches
        X-Model-Hash. An existing .part is continued with a Range request; if the server sends the
        whole file instead, or the finished file's hash does not match, it starts over from zero.
        """
        path = self._version_path(model_id, version) + "/download"
        params = {"format": format} if format else {}
        target = Path(dest)
        if target.is_dir():
            target = target / _filename_of(self._probe(path, params), f"model_v{version}")
        part = target.with_name(target.name + ".part")
        if not self._fetch(path, params, part, progress):
            part.unlink()
            self._fetch(path, params, part, progress)
        os.replace(part, target)
        return target

    def _fetch(self, path: str, params: dict[str, str], part: Path, progress: Progress | None) -> bool:
        """Bring part up to the whole verified file; False when a resumed part turns out not to belong to it."""
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        done = 0
        try:
            with self._http.stream("GET", path, params=params, headers=headers) as resp:
                if resp.status_code == 416:
                    return False
                if resp.status_code >= 400:
                    resp.read()
                    raise _error_of(resp)
                expected = resp.headers.get("x-model-hash", "")
                length = int(resp.headers.get("content-length", 0))
                if resp.status_code != 206:
                    offset = 0
                elif _range_start(resp) != offset:
                    return False
                total = offset + length
                with open(part, "r+b" if offset else "wb") as out:
                    digest = _hash_prefix(out, offset)
                    out.truncate()
                    done = offset
                    if progress:
                        progress(done, total)
                    for chunk in resp.iter_bytes(CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
                    out.flush()
                    os.fsync(out.fileno())
        except httpx.TransportError as exc:
            raise OctomilLiteError(0, "unreachable", f"The download from {self.base_url} stopped after {done} bytes "
                                   f"({exc or type(exc).__name__}); run it again to resume.") from None
        if done != total:
            raise OctomilLiteError(0, "unreachable", f"The download stopped after {done} of {total} bytes; "
                                   "run it again to resume.")
        if expected and expected != f"sha256:{digest.hexdigest()}":
            if offset:
                return False
            part.unlink()
            raise OctomilLiteError(0, "hash_mismatch", f"The downloaded bytes hash to sha256:{digest.hexdigest()}, "
                                   f"but the server announced {expected}.")
        return True

    # federated learning rounds

    def open_round(self, model_id: str, version: int | str | None = None, **fields: Any) -> dict[str, Any]:
        """Open a training round on a version (None: the newest; for source='flower', no base at all)."""
        return self._json("POST", "/training/rounds", json={"model_id": model_id, "version": version, **fields})

    def record_round_result(self, round_id: str, version: int | str, metrics: dict[str, float] | None = None,
                            participants: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Close a round aggregated elsewhere (Flower) with the version it produced."""
        return self._json("POST", f"/training/rounds/{quote(round_id, safe='')}/result",
                          json={"version": version, "metrics": metrics or {}, "participants": participants or []})

    def update_round_metrics(self, round_id: str, metrics: dict[str, float]) -> dict[str, Any]:
        """Merge metrics into a round's (evaluation results that arrive after aggregation)."""
        return self._json("PATCH", f"/training/rounds/{quote(round_id, safe='')}", json={"metrics": metrics})

    def list_rounds(self, model_id: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("model_id", model_id), ("status", status)) if v is not None}
        return self._json("GET", "/training/rounds", params=params)["rounds"]  # type: ignore[no-any-return]

    def round_updates(self, round_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/training/rounds/{quote(round_id, safe='')}/updates")["updates"]  # type: ignore[no-any-return]

    def _probe(self, path: str, params: dict[str, str]) -> httpx.Response:
        """The headers of a download, from a 1-byte ranged GET (whose error body, unlike HEAD's, says why)."""
        try:
            with self._http.stream("GET", path, params=params, headers={"Range": "bytes=0-0"}) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise _error_of(resp)
                return resp
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def wait_for_format(self, model_id: str, version: int | str, format: str, timeout: float = 600) -> None:
        """Block until a version can be downloaded in this format; raise if it failed, cannot be made or timed out."""
        path = self._version_path(model_id, version) + "/download"
        deadline = time.monotonic() + timeout
        params = {"format": format}
        while True:
            try:
                resp = self._http.head(path, params=params)
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from None
            if resp.status_code < 400:
                return
            if resp.status_code != 404 or "retry-after" not in resp.headers:
                self._probe(path, params)  # raises with the server's reason, unless it has just become ready
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise OctomilLiteError(0, "timeout", f"Version {version} of model {model_id} was still being "
                                       f"converted to {format} after {timeout:g} s.")
            try:
                pause = float(resp.headers["retry-after"])
            except ValueError:
                pause = 1.0
            time.sleep(min(max(pause, 0.0), left))


def _range_start(resp: httpx.Response) -> int | None:
    """The first byte offset of a 206 answer, from Content-Range: bytes a-b/total."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("content-range", "").strip())
    return int(match.group(1)) if match else None


def _hash_prefix(file: BinaryIO, size: int) -> hashlib._Hash:
    """A sha256 fed with the first size bytes of file, leaving the position at size."""
    digest = hashlib.sha256()
    while file.tell() < size:
        chunk = file.read(min(CHUNK_BYTES, size - file.tell()))
        if not chunk:
            break
        digest.update(chunk)
    return digest
