"""A lean S3 client for the store's reads: GET (whole or a byte range), HEAD and
ListObjectsV2 on the standard library (``http.client`` keep-alive connections, SigV4
with ``hmac``, ``xml.etree``).

Why: a command that only reads (``flor-ray runs``, ``df``, ``sql``, a dry-run plan)
would otherwise spend ~0.5 s importing s3fs/aiobotocore/botocore and ~0.4 s more on
its first request (a botocore session, its service models, the credential chain),
several times what its requests cost. Writes, deletes and renames stay on s3fs.

Which path a store takes (:func:`for_store`): the lean reader only where it can do
exactly what s3fs would, else s3fs, as if this module did not exist:

- ``FLOR_S3_READER=s3fs`` in the environment: s3fs (the switch to compare the two).
- the URL is ``s3://`` (``s3a://`` and others: s3fs);
- the storage options hold only what is understood here: ``key``, ``secret``,
  ``token``, ``endpoint_url``, ``client_kwargs`` with only ``endpoint_url`` and
  ``region_name``, ``use_listings_cache`` and a false ``anon`` (any other option, such
  as ``anon=True``, ``profile``, ``config_kwargs``, ``requester_pays`` or
  ``version_aware``, changes what s3fs does: s3fs);
- credentials resolve statically, in botocore's order: ``key``/``secret`` (and
  ``token``) of the options; else ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
  (``AWS_SESSION_TOKEN``); else the profile (``AWS_PROFILE``, default ``default``) of
  the shared credentials file (``AWS_SHARED_CREDENTIALS_FILE``) or of the config file
  (``AWS_CONFIG_FILE``). A profile that assumes a role, uses SSO, a
  ``credential_process`` or a web identity, an environment naming a web identity, or
  no credentials at all (an instance or container role, anonymous access): s3fs,
  whose credential chain knows how.
- the endpoint: the options', else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
  addressed path-style (``endpoint/bucket/key``), as S3-compatible servers expect;
  without one, AWS itself, virtual-hosted (``bucket.s3.REGION.amazonaws.com``;
  path-style for bucket names with dots, which TLS certificates do not cover), in the
  region of ``client_kwargs.region_name``, ``AWS_REGION``, ``AWS_DEFAULT_REGION`` or
  the profile, and in the bucket's own region when S3 answers that it lives elsewhere.
  A profile or environment configuring endpoints in a way not listed: s3fs.

Requests wait at most the settings ``connect_timeout_s`` / ``read_timeout_s``, and
are tried :data:`flor_ray.store.S3_ATTEMPTS` times on a 5xx answer, a reset
connection or a timeout, as s3fs's are. Errors: a missing key is
``FileNotFoundError``, a 403 ``PermissionError`` with S3's code and message, any other
answer an ``OSError`` naming the status, code and message; timeouts are
:class:`ConnectTimeoutError` / :class:`ReadTimeoutError`.
"""

from __future__ import annotations

import configparser
import datetime as _dt
import errno
import hashlib
import hmac
import http.client
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import quote, urlsplit

__all__ = ["Credentials", "S3Reader", "for_store", "sign", "ConnectTimeoutError", "ReadTimeoutError"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_OPTIONS = {"key", "secret", "token", "endpoint_url", "client_kwargs", "use_listings_cache", "anon"}
_CLIENT_OPTIONS = {"endpoint_url", "region_name"}
#: profile settings that make botocore get credentials some other way than reading them
_DYNAMIC = ("role_arn", "source_profile", "credential_source", "credential_process", "web_identity_token_file",
            "sso_session", "sso_start_url", "sso_account_id", "login_session")
#: profile settings that change where or how requests go (endpoints, addressing)
_ROUTING = ("endpoint_url", "services", "s3", "use_fips_endpoint", "use_dualstack_endpoint", "ca_bundle")
_RETRIED = (500, 502, 503, 504)
#: seconds before a request's second attempt (s3fs waits about this long)
BACKOFF_S = 0.1
#: bytes of a Parquet file's end fetched in one GET to read its footer: a segment's
#: footer (its origin list, ~100 bytes a file it holds) for thousands of runs, and a
#: record part whole
TAIL_BYTES = 1 << 20
#: immutable files' ends kept by a reader (:meth:`S3Reader.tail` ``keep``)
_TAILS_KEPT = 16


class ConnectTimeoutError(TimeoutError):
    """The endpoint did not accept a connection within ``connect_timeout_s``."""


class ReadTimeoutError(TimeoutError):
    """The endpoint did not answer within ``read_timeout_s``."""


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None


@dataclass(frozen=True)
class Reply:
    """One answer: status, headers (lower-case names) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


# ------------------------------------------------------------------ signing
def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def canonical_query(params: Mapping[str, str]) -> str:
    """The query string as SigV4 wants it (and as it is sent): encoded, sorted."""
    pairs = sorted((quote(k, safe="-_.~"), quote(str(v), safe="-_.~")) for k, v in params.items())
    return "&".join(f"{k}={v}" for k, v in pairs)


def sign(method: str, host: str, path: str, params: Mapping[str, str], headers: Mapping[str, str],
         creds: Credentials, region: str, amz_date: str) -> dict[str, str]:
    """The headers of a signed S3 request (AWS Signature Version 4, empty payload):
    ``headers`` plus host, x-amz-date, x-amz-content-sha256, the token and Authorization.
    ``path`` is the URI-encoded path as sent (S3 signs it without normalising)."""
    out = {k.lower(): v for k, v in headers.items()}
    out.update({"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": EMPTY_SHA256})
    if creds.token:
        out["x-amz-security-token"] = creds.token
    names = sorted(out)
    canonical = "\n".join([method, path, canonical_query(params),
                           "".join(f"{n}:{' '.join(str(out[n]).split())}\n" for n in names),
                           ";".join(names), EMPTY_SHA256])
    day = amz_date[:8]
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = _hmac(_hmac(_hmac(_hmac(("AWS4" + creds.secret_key).encode(), day), region), "s3"), "aws4_request")
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    out["authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                            f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return out


# ------------------------------------------------------------ configuration
def _profile(env: Mapping[str, str]) -> tuple[dict, dict] | None:
    """The profile's sections of the shared credentials file and of the config file
    ({} where absent); None when a file does not parse (s3fs reports it)."""
    name = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    creds_file = env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
    conf_file = env.get("AWS_CONFIG_FILE") or "~/.aws/config"
    out = []
    for path, section in ((creds_file, name), (conf_file, name if name == "default" else f"profile {name}")):
        parser = configparser.RawConfigParser()
        try:
            parser.read(os.path.expanduser(path))
        except (configparser.Error, UnicodeDecodeError):
            return None
        out.append(dict(parser.items(section)) if parser.has_section(section) else {})
    return out[0], out[1]


def _credentials(options: Mapping[str, Any], env: Mapping[str, str], creds_sec: dict,
                 conf_sec: dict) -> Credentials | None:
    if "key" in options or "secret" in options:
        if options.get("key") and options.get("secret"):
            return Credentials(str(options["key"]), str(options["secret"]), options.get("token") or None)
        return None
    if options.get("token"):
        return None
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key or secret:
        return Credentials(key, secret, env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN") or None) \
            if key and secret else None
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or any(k in conf_sec for k in _DYNAMIC):
        return None
    for sec in (creds_sec, conf_sec):
        if any(k in sec for k in _DYNAMIC):
            return None
        if sec.get("aws_access_key_id") and sec.get("aws_secret_access_key"):
            return Credentials(sec["aws_access_key_id"], sec["aws_secret_access_key"],
                               sec.get("aws_session_token") or sec.get("aws_security_token") or None)
    return None


def for_store(url: str, options: Mapping[str, Any], env: Mapping[str, str] | None = None) -> "S3Reader | None":
    """The lean reader of the store at ``url``; None where s3fs must read it (the
    module docstring lists the cases)."""
    env = os.environ if env is None else env
    if env.get("FLOR_S3_READER", "").strip().lower() == "s3fs" or not url.startswith("s3://"):
        return None
    client = options.get("client_kwargs") or {}
    if set(options) - _OPTIONS or not isinstance(client, Mapping) or set(client) - _CLIENT_OPTIONS:
        return None
    if options.get("anon"):  # unsigned requests: s3fs's
        return None
    if options.get("endpoint_url") and client.get("endpoint_url"):
        return None
    profile = _profile(env)
    if profile is None:
        return None
    creds_sec, conf_sec = profile
    if any(k in conf_sec for k in _ROUTING) or any(k in creds_sec for k in _ROUTING):
        return None
    creds = _credentials(options, env, creds_sec, conf_sec)
    if creds is None:
        return None
    endpoint = options.get("endpoint_url") or client.get("endpoint_url")
    if not endpoint:
        if str(env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "")).lower() == "true":
            return None
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = (client.get("region_name") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
              or conf_sec.get("region") or None)
    if endpoint:
        parts = urlsplit(str(endpoint))
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            return None
    from ..config import load_settings

    s = load_settings()
    return S3Reader(creds, str(endpoint) if endpoint else None, region, s.connect_timeout_s, s.read_timeout_s)


# ------------------------------------------------------------------ client
def _error(body: bytes) -> tuple[str, str]:
    """S3's error code and message from an error answer's XML ('' where absent)."""
    if not body:
        return "", ""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", body[:200].decode(errors="replace")
    return (root.findtext("Code") or root.findtext(f"{_NS}Code") or "",
            root.findtext("Message") or root.findtext(f"{_NS}Message") or "")


def _raise_for(reply: Reply, what: str) -> None:
    if reply.status < 300:
        return
    code, message = _error(reply.body)
    if reply.status == 404:
        raise FileNotFoundError(errno.ENOENT, f"{code or 'NotFound'}: {message or 'no such key'}", what)
    if reply.status == 403:
        raise PermissionError(errno.EACCES, f"{code or 'AccessDenied'}: {message or 'access denied'}", what)
    raise OSError(f"S3 answered {reply.status} {code or http.client.responses.get(reply.status, '')} "
                  f"for {what}: {message}".rstrip(": "))


def _region_of(body: bytes) -> str | None:
    """The region an error answer (PermanentRedirect, AuthorizationHeaderMalformed) names."""
    if b"<Region>" not in body:
        return None
    return body.split(b"<Region>", 1)[1].split(b"</Region>", 1)[0].decode(errors="replace").strip() or None


def _timestamp(text: str) -> _dt.datetime:
    """A listing's LastModified as botocore parses it (timezone-aware, UTC)."""
    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(_dt.timezone.utc)


class S3Reader:
    """Reads of one store's objects; paths are s3fs's: ``bucket/key``. Thread-safe:
    idle keep-alive connections are pooled per host."""

    def __init__(self, creds: Credentials, endpoint: str | None, region: str | None,
                 connect_timeout: float, read_timeout: float):
        self.creds, self.endpoint = creds, endpoint.rstrip("/") if endpoint else None
        self.region = region or "us-east-1"
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._regions: dict[str, str] = {}  # bucket -> its region, learnt from a redirect
        self._tails: dict[tuple[str, int], tuple[bytes, int]] = {}
        self._idle: dict[tuple, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    # --------------------------------------------------------------- addressing
    def _where(self, bucket: str, key: str) -> tuple[str, str, str, str]:
        """scheme, host, URI-encoded path, signing region of an object."""
        region = self._regions.get(bucket, self.region)
        qkey = quote(key, safe="/~")
        if self.endpoint:
            parts = urlsplit(self.endpoint)
            base = parts.path.rstrip("/")
            return parts.scheme, parts.netloc, f"{base}/{quote(bucket, safe='~')}/{qkey}", region
        if "." in bucket:
            return "https", f"s3.{region}.amazonaws.com", f"/{bucket}/{qkey}", region
        return "https", f"{bucket}.s3.{region}.amazonaws.com", f"/{qkey}", region

    # ------------------------------------------------------------- connections
    def _connection(self, scheme: str, host: str) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get((scheme, host))
            if idle:
                return idle.pop(), True
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = cls(host, timeout=self.connect_timeout)
        try:
            conn.connect()
        except (socket.timeout, TimeoutError) as exc:
            conn.close()
            raise ConnectTimeoutError(f"connecting to {scheme}://{host} timed out after "
                                      f"{self.connect_timeout:g} s") from exc
        conn.sock.settimeout(self.read_timeout)
        return conn, False

    def _release(self, scheme: str, host: str, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault((scheme, host), []).append(conn)

    def _once(self, method: str, bucket: str, key: str, params: Mapping[str, str],
              headers: Mapping[str, str]) -> Reply:
        scheme, host, path, region = self._where(bucket, key)
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        signed = sign(method, host, path, params, headers, self.creds, region, amz_date)
        target = path + ("?" + canonical_query(params) if params else "")
        for fresh_try in (False, True):
            conn, reused = self._connection(scheme, host)
            try:
                conn.request(method, target, headers=signed)
                resp = conn.getresponse()
                body = resp.read()
            except (socket.timeout, TimeoutError) as exc:
                conn.close()
                raise ReadTimeoutError(f"{scheme}://{host} did not answer within {self.read_timeout:g} s") from exc
            except (ConnectionError, http.client.HTTPException, OSError):
                conn.close()
                if reused and not fresh_try:
                    continue  # a keep-alive connection the server had closed: once more, on a new one
                raise
            if resp.will_close:
                conn.close()
            else:
                self._release(scheme, host, conn)
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
        raise AssertionError("unreachable")

    def request(self, method: str, bucket: str, key: str = "", params: Mapping[str, str] | None = None,
                headers: Mapping[str, str] | None = None) -> Reply:
        """One request, tried :data:`S3_ATTEMPTS` times on a 5xx answer, a reset connection
        or a timeout, and again in the bucket's region when S3 says it lives elsewhere."""
        from . import S3_ATTEMPTS

        params, headers = params or {}, headers or {}
        for attempt in range(1, S3_ATTEMPTS + 1):
            try:
                reply = self._once(method, bucket, key, params, headers)
            except (ConnectionError, TimeoutError, http.client.HTTPException, OSError) as exc:
                if attempt == S3_ATTEMPTS:
                    if isinstance(exc, http.client.HTTPException):  # a broken answer: callers take OSErrors
                        raise ConnectionError(f"a broken answer from S3: {type(exc).__name__}: {exc}") from exc
                    raise
                time.sleep(BACKOFF_S * attempt)
                continue
            if reply.status in (301, 307, 400) and not self.endpoint:
                region = reply.headers.get("x-amz-bucket-region") or _region_of(reply.body)
                if region and region != self._regions.get(bucket, self.region):
                    self._regions[bucket] = region
                    return self.request(method, bucket, key, params, headers)
            if reply.status in _RETRIED and attempt < S3_ATTEMPTS:
                time.sleep(BACKOFF_S * attempt)
                continue
            return reply
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ reads
    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        bucket, _, key = path.lstrip("/").partition("/")
        return bucket, key

    def get(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes (``start``/``end``: the range [start, end), as cat_file's)."""
        bucket, key = self._split(path)
        headers = {}
        if start is not None or end is not None:
            headers["range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
        reply = self.request("GET", bucket, key, headers=headers)
        if reply.status == 416:
            return b""
        _raise_for(reply, path)
        return reply.body

    def tail(self, path: str, n: int, keep: bool = False) -> tuple[bytes, int]:
        """The object's last ``n`` bytes (all of it when smaller) and its size: one GET.
        ``keep``: the object never changes (a segment: its name is new at every write),
        so its end is kept for the next call with ``keep`` (the footer read of a listing,
        then pyarrow's opening of the same file)."""
        if keep:
            with self._lock:
                hit = self._tails.get((path, n))
            if hit is not None:
                return hit
        out = self._tail(path, n)
        if keep:
            with self._lock:
                if len(self._tails) >= _TAILS_KEPT:
                    self._tails.clear()
                self._tails[(path, n)] = out
        return out

    def _tail(self, path: str, n: int) -> tuple[bytes, int]:
        bucket, key = self._split(path)
        reply = self.request("GET", bucket, key, headers={"range": f"bytes=-{n}"})
        if reply.status == 416:  # an empty object
            return b"", 0
        _raise_for(reply, path)
        total = reply.headers.get("content-range", "").rpartition("/")[2]
        return reply.body, int(total) if total.isdigit() else len(reply.body)

    def head(self, path: str) -> dict | None:
        """The object's size and stamps; None when there is no such key."""
        bucket, key = self._split(path)
        reply = self.request("HEAD", bucket, key)
        if reply.status == 404:
            return None
        _raise_for(reply, path)
        return {"name": path, "size": int(reply.headers.get("content-length", 0)), "type": "file",
                "ETag": reply.headers.get("etag")}

    def list(self, path: str, recursive: bool = False, start_after: str = "", until: str = "") -> list[dict]:
        """The objects below the folder ``path`` (s3fs's info dicts: name, size, type,
        LastModified, ETag), and with ``recursive`` false its subfolders (type
        "directory"); every page of the listing (``start_after``, ``until``: only the
        keys after the one and up to the other, both ``bucket/key`` paths)."""
        import xml.etree.ElementTree as ET

        bucket, key = self._split(path.rstrip("/"))
        prefix = f"{key}/" if key else ""
        params = {"list-type": "2", "prefix": prefix}
        if not recursive:
            params["delimiter"] = "/"
        if start_after:
            params["start-after"] = self._split(start_after)[1]
        last = self._split(until)[1] if until else ""
        out: list[dict] = []
        while True:
            reply = self.request("GET", bucket, "", params=params)
            _raise_for(reply, path)
            root = ET.fromstring(reply.body)
            for c in root.iter(f"{_NS}Contents"):
                k = c.findtext(f"{_NS}Key") or ""
                if k.endswith("/"):
                    continue  # a folder marker
                out.append({"name": f"{bucket}/{k}", "size": int(c.findtext(f"{_NS}Size") or 0), "type": "file",
                            "LastModified": _timestamp(c.findtext(f"{_NS}LastModified") or ""),
                            "ETag": c.findtext(f"{_NS}ETag")})
            for p in root.iter(f"{_NS}CommonPrefixes"):
                out.append({"name": f"{bucket}/{(p.findtext(f'{_NS}Prefix') or '').rstrip('/')}", "size": 0,
                            "type": "directory"})
            token = root.findtext(f"{_NS}NextContinuationToken")
            if root.findtext(f"{_NS}IsTruncated") != "true" or not token or (last and out and out[-1]["name"] >= until):
                return [e for e in out if e["name"] <= until] if last else out
            params = {**params, "continuation-token": token}

    def exists(self, path: str) -> bool:
        """Whether an object or a folder is at ``path`` (s3fs's ``exists``)."""
        return self.head(path) is not None or self.is_folder(path)

    def is_folder(self, path: str) -> bool:
        """Whether keys start with ``path/``: one listing of one key."""
        bucket, key = self._split(path.rstrip("/"))
        reply = self.request("GET", bucket, "", params={"list-type": "2", "prefix": f"{key}/", "max-keys": "1"})
        if reply.status == 404:
            return False
        _raise_for(reply, path)
        return b"<Contents>" in reply.body or b"<CommonPrefixes>" in reply.body
