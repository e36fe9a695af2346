"""AWS conventions for the S3 store: settings from the standard variables and profile files, and the two
bucket calls obstore does not offer (list and abort multipart uploads), signed with SigV4."""

from __future__ import annotations

import configparser
import datetime
import hashlib
import hmac
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from . import StorageError

_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@dataclass(frozen=True)
class AwsSettings:
    """Endpoint, region and credentials from the standard AWS variables, else from the profile files."""

    region: str
    endpoint: str | None
    access_key: str | None
    secret_key: str | None
    token: str | None

    @classmethod
    def from_environment(cls) -> AwsSettings:
        env = os.environ
        profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
        creds = configparser.ConfigParser()
        creds.read(Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials").expanduser())
        conf = configparser.ConfigParser()
        conf.read(Path(env.get("AWS_CONFIG_FILE") or "~/.aws/config").expanduser())
        section = profile if profile == "default" else f"profile {profile}"

        def pick(var: str, key: str) -> str | None:
            if env.get(var):
                return env[var]
            for parser, name in ((creds, profile), (conf, section)):
                if parser.has_option(name, key):
                    return parser.get(name, key)
            return None

        return cls(region=pick("AWS_REGION", "region") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                   endpoint=pick("AWS_ENDPOINT_URL_S3", "endpoint_url") or pick("AWS_ENDPOINT_URL", "endpoint_url"),
                   access_key=pick("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
                   secret_key=pick("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
                   token=pick("AWS_SESSION_TOKEN", "aws_session_token"))


def _signing_key(secret: str, day: str, region: str) -> bytes:
    key = f"AWS4{secret}".encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


class BucketApi:
    """The two calls obstore lacks (list and abort multipart uploads), signed with SigV4 over httpx."""

    def __init__(self, settings: AwsSettings, bucket: str):
        self.settings = settings
        self.bucket = bucket
        self.base = (settings.endpoint or f"https://s3.{settings.region}.amazonaws.com").rstrip("/")

    async def _request(self, method: str, key: str, query: dict[str, str]) -> bytes:
        import httpx

        now = datetime.datetime.now(datetime.UTC)
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        path = f"/{self.bucket}/{quote(key, safe='/~')}" if key else f"/{self.bucket}"
        canonical_query = "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in sorted(query.items()))
        host = urlsplit(self.base).netloc
        headers = {"host": host, "x-amz-content-sha256": hashlib.sha256(b"").hexdigest(), "x-amz-date": stamp}
        if self.settings.token:
            headers["x-amz-security-token"] = self.settings.token
        signed = ";".join(sorted(headers))
        canonical = "\n".join([method, path, canonical_query, *(f"{k}:{headers[k]}" for k in sorted(headers)), "",
                               signed, headers["x-amz-content-sha256"]])
        scope = f"{day}/{self.settings.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        signature = hmac.new(_signing_key(self.settings.secret_key or "", day, self.settings.region),
                             to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.settings.access_key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={signature}")
        async with httpx.AsyncClient(timeout=60) as client:
            resp = await client.request(method, f"{self.base}{path}", params=query or None, headers=headers)
        if resp.status_code >= 300 and not (method == "DELETE" and resp.status_code == 404):
            raise StorageError(f"The object store refused {method} {path}: {resp.status_code} {resp.text[:200]}")
        return resp.content

    async def multipart_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        """(key, upload id, initiated epoch seconds) of every unfinished multipart upload under `prefix`."""
        found: list[tuple[str, str, float]] = []
        marker: dict[str, str] = {}
        while True:
            root = ET.fromstring(await self._request("GET", "", {"uploads": "", "prefix": prefix, **marker}))
            for upload in root.iter(f"{_S3_NS}Upload"):
                initiated = datetime.datetime.fromisoformat(upload.findtext(f"{_S3_NS}Initiated", "").rstrip("Z"))
                found.append((upload.findtext(f"{_S3_NS}Key", ""), upload.findtext(f"{_S3_NS}UploadId", ""),
                              initiated.replace(tzinfo=datetime.UTC).timestamp()))
            if root.findtext(f"{_S3_NS}IsTruncated") != "true":
                return found
            marker = {"key-marker": root.findtext(f"{_S3_NS}NextKeyMarker", ""),
                      "upload-id-marker": root.findtext(f"{_S3_NS}NextUploadIdMarker", "")}

    async def abort(self, key: str, upload_id: str) -> None:
        await self._request("DELETE", key, {"uploadId": upload_id})
