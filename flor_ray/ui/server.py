"""The UI's HTTP server: the standard library's ThreadingHTTPServer, a small router,
JSON endpoints and one static page.

Security model:
- bound to a loopback address (the default, 127.0.0.1), the page and the GET
  endpoints answer only requests whose ``Host`` is that loopback name and port, so a
  web page elsewhere cannot reach them through DNS rebinding;
- bound to any other address, every request needs the token generated at start-up
  (printed in the URL): ``?token=`` once (it sets an HttpOnly cookie), the cookie, or
  an ``X-Flor-Token`` header; compared in constant time;
- every POST (planning and starting a replay) needs the token in ``X-Flor-Token``
  whatever the address: the page gets it from its own HTML, which another origin
  cannot read, so a cross-site form cannot start a replay;
- no endpoint writes to the store or runs SQL other than through ``flor.sql``'s
  sandbox; starting a replay writes what a replay writes.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import secrets
import socket
import sys
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, urlsplit

from ..errors import FlorError, InvalidNameError, UnknownRunError
from . import api
from .jobs import Jobs

if TYPE_CHECKING:  # pragma: no cover
    from ..store import Store

__all__ = ["UiServer", "make_server", "serve", "is_loopback"]

STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
_COOKIE = "flor_token"
MAX_BODY = 64 * 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any


Route = tuple[str, "re.Pattern[str]", Callable[..., Any]]


def _routes(store: "Store", jobs: Jobs) -> list[Route]:
    def p(req: Request, key: str, default: str | None = None) -> str | None:
        return req.query.get(key, default)

    return [
        ("GET", re.compile(r"/api/runs"), lambda r: api.runs(store, p(r, "where"))),
        ("GET", re.compile(r"/api/series"),
         lambda r: api.series(store, p(r, "name", ""), p(r, "where"), p(r, "by", "run"), p(r, "raw") == "1")),
        ("GET", re.compile(r"/api/parallel"),
         lambda r: api.parallel(store, p(r, "metric", ""), p(r, "where"), p(r, "agg", "last"))),
        ("GET", re.compile(r"/api/run/([^/]+)"), lambda r, rid: api.run_detail(store, rid)),
        ("GET", re.compile(r"/api/run/([^/]+)/diff"), lambda r, rid: api.diff(store, rid, p(r, "against", ""))),
        ("GET", re.compile(r"/api/run/([^/]+)/file"), lambda r, rid: api.source(store, rid, p(r, "path", ""))),
        ("GET", re.compile(r"/api/replays"), lambda r: {**api.replays(store), "jobs": jobs.list()}),
        ("GET", re.compile(r"/api/replays/([^/]+)"), lambda r, rid: api.replay_detail(store, rid)),
        ("GET", re.compile(r"/api/jobs/([^/]+)"), lambda r, jid: jobs.describe(jid)),
        ("POST", re.compile(r"/api/jobs"), lambda r: jobs.plan(r.body)),
        ("POST", re.compile(r"/api/jobs/([^/]+)/start"), lambda r, jid: jobs.start(jid)),
    ]


class UiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: "Store", host: str, port: int, quiet: bool = True, ray_address: str | None = None):
        self.store, self.quiet = store, quiet
        self.token = secrets.token_urlsafe(24)
        self.loopback = is_loopback(host)
        self.jobs = Jobs(store, ray_address)
        self.routes = _routes(store, self.jobs)
        super().__init__((host, port), _Handler)
        self.port = self.server_address[1]
        shown = socket.gethostname() if host in ("", "0.0.0.0", "::") else host
        self.allowed_hosts = {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]", shown)}
        self.url = f"http://{shown if ':' not in shown else f'[{shown}]'}:{self.port}/"
        if not self.loopback:
            self.url += f"?token={self.token}"

    def token_ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())


class _Handler(BaseHTTPRequestHandler):
    server: UiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(fmt, *args)

    # ------------------------------------------------------------ responses
    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj, default=str, allow_nan=False).encode(), "application/json", headers)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message, "status": status})

    # ---------------------------------------------------------------- guard
    def _cookie_token(self) -> str | None:
        for part in (self.headers.get("Cookie") or "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == _COOKIE:
                return v
        return None

    def _allowed(self, query: dict[str, str]) -> tuple[bool, dict[str, str]]:
        """Whether the request may go on, and headers to send (the cookie)."""
        srv = self.server
        if self.command == "POST" and not srv.token_ok(self.headers.get("X-Flor-Token")):
            return False, {}
        if srv.loopback:
            return (self.headers.get("Host") or "") in srv.allowed_hosts, {}
        if srv.token_ok(self.headers.get("X-Flor-Token")) or srv.token_ok(self._cookie_token()):
            return True, {}
        if srv.token_ok(query.get("token")):
            return True, {"Set-Cookie": f"{_COOKIE}={srv.token}; HttpOnly; SameSite=Strict; Path=/"}
        return False, {}

    # ------------------------------------------------------------- dispatch
    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        ok, headers = self._allowed(query)
        if not ok:
            self._discard_body()
            return self._error(403, "this server needs its token: open the URL that `flor-ray ui` printed "
                                    "(POST requests send it as X-Flor-Token)")
        if url.path.startswith("/api/"):
            return self._api(url.path, query, headers)
        if self.command == "POST":
            return self._error(405, "only /api/ endpoints take POST")
        self._static(url.path, headers)

    def _discard_body(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if 0 < n <= MAX_BODY:
            self.rfile.read(n)
        elif n:
            self.close_connection = True

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise InvalidNameError("request body", f"{n} bytes", f"send at most {MAX_BODY} bytes")
        raw = self.rfile.read(n) if n else b"{}"
        try:
            return json.loads(raw or b"{}")
        except ValueError as exc:
            raise InvalidNameError("request body", raw[:80].decode("utf-8", "replace"),
                                   f"send a JSON object ({exc})") from exc

    def _api(self, path: str, query: dict[str, str], headers: dict[str, str]) -> None:
        method = "GET" if self.command == "HEAD" else self.command
        for m, pattern, fn in self.server.routes:
            hit = pattern.fullmatch(path)
            if hit and m == method:
                break
        else:
            self._discard_body()
            return self._error(404, f"no endpoint {self.command} {path}")
        try:
            body = self._body() if method == "POST" else None
            result = fn(Request(method, path, query, body), *hit.groups())
        except (api.NotFound, UnknownRunError) as exc:
            return self._error(404, str(exc))
        except FlorError as exc:
            return self._error(400, " ".join(str(exc).split()))
        except Exception as exc:  # noqa: BLE001 - a bug: the traceback goes to the server's stderr
            traceback.print_exc(file=sys.stderr)
            return self._error(500, f"internal error: {type(exc).__name__}: {exc}; this is a bug in flor_ray, "
                                    "the server's terminal shows the traceback")
        self._json(200, result, headers)

    def _static(self, path: str, headers: dict[str, str]) -> None:
        name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if path not in ("/", "/index.html") and not path.startswith("/static/") or name not in files:
            return self._error(404, f"no page {path}")
        data = files[name].read_bytes()
        if name == "index.html":
            data = data.replace(b"{{TOKEN}}", self.server.token.encode())
        self._send(200, data, _TYPES.get(files[name].suffix, "application/octet-stream"), headers)


def make_server(store: "Store", host: str = "127.0.0.1", port: int = 0, quiet: bool = True,
                ray_address: str | None = None) -> UiServer:
    """A server bound to (host, port), not yet serving (port 0: a free one)."""
    return UiServer(store.check(), host, port, quiet=quiet, ray_address=ray_address)


def serve(store: "Store", host: str = "127.0.0.1", port: int = 8765, quiet: bool = True,
          ray_address: str | None = None) -> None:
    """Serve until interrupted."""
    srv = make_server(store, host, port, quiet=quiet, ray_address=ray_address)
    print(f"flor-ray ui: {srv.url}  (store {store.url}; Ctrl-C stops)", flush=True)
    if not srv.loopback:
        print("flor-ray ui: bound to a non-loopback address: every request needs the token in that URL",
              flush=True)
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
