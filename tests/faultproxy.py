"""A fault-injecting HTTP proxy for the S3 tests: sits on 127.0.0.1 in front of the moto
endpoint and breaks some requests on purpose, the way real object stores and networks do.

Faults (``ACTIONS``):

==================  =========================================================================
``error500``        500 InternalError instead of forwarding
``error503``        503 ServiceUnavailable instead of forwarding
``slowdown``        503 SlowDown (S3's throttling answer) instead of forwarding
``reset_upload``    connection reset after reading half the request body (mid-upload)
``stall``           request read, nothing answered for ``stall_seconds``, then closed
``lose_response``   request forwarded (the store acts on it), then the connection is reset
                    before the client sees the answer (a PUT that "failed" but succeeded)
``reset_download``  response headers and half the body sent, then a reset (mid-download)
``truncate``        response headers and half the body sent, then a clean close
``corrupt``         one byte of the response body flipped (only when asked for explicitly)
``access_denied``   403 AccessDenied instead of forwarding, as for a missing IAM permission
                    (only when asked for explicitly)
==================  =========================================================================

Two ways to schedule them, both deterministic:

* ``rules``: targeted faults, e.g. ``Rule("reset_upload", method="PUT", query="partNumber=2")``;
  the first matching rule with budget left applies (``skip`` lets matching requests through
  first, ``times`` bounds how many get the fault).
* ``chaos``: seeded random faults. Whether the n-th request with a given *identity* (method,
  path with bucket, backup ids, timestamps and table oids masked, part number) is broken depends only on the
  seed, that identity and n, not on the clock; so a command that sends its requests in a
  fixed order (``--jobs 1``) meets exactly the same faults on every run. No identity is
  broken more than ``max_per_request`` times in a row (so a client retrying more often than
  that always gets through), and the run stops injecting after ``max_faults``.

``on_fault`` (optional) is called with each :class:`Fault` once it has been applied, so a
test can act at that moment (e.g. replace an object between a broken download and its
resumption).

Bounded by construction: stalls last ``stall_seconds``, every connection is closed after one
response (``Connection: close``), and :meth:`FaultProxy.stop` ends everything.
Test-only code; nothing here imports ``backup_tool``.
"""

from __future__ import annotations

import hashlib
import re
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator
from urllib.parse import parse_qsl, urlsplit

ACTIONS = ("error500", "error503", "slowdown", "reset_upload", "stall", "lose_response",
           "reset_download", "truncate", "corrupt", "access_denied")
CHAOS_ACTIONS = ("error500", "error503", "slowdown", "reset_upload", "stall", "lose_response",
                 "reset_download", "truncate")
STAMPED = re.compile(r"\d{8}T\d{6,}Z-\w+")
UUID_HEX = re.compile(r"[0-9a-f]{32}")
TABLE_OID = re.compile(r"/data/\d+\.")
ERRORS = {
    "error500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "error503": (503, "Service Unavailable", "ServiceUnavailable", "Please reduce your request rate."),
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "access_denied": (403, "Forbidden", "AccessDenied", "Access Denied"),
}
IO_TIMEOUT = 30.0


@dataclass
class Rule:
    """Break requests matching ``method`` and the regexes ``path`` / ``query`` with ``action``."""

    action: str
    method: str | None = None
    path: str | None = None
    query: str | None = None
    times: int = 1
    skip: int = 0
    seen: int = field(default=0, compare=False)
    fired: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault {self.action!r}")

    def matches(self, req: Request) -> bool:
        return ((self.method is None or req.method == self.method)
                and (self.path is None or re.search(self.path, req.path) is not None)
                and (self.query is None or re.search(self.query, req.query) is not None))


@dataclass(frozen=True)
class Chaos:
    """Seeded random faults: ``rate`` of requests, at most ``max_per_request`` times in a row
    for one request identity, at most ``max_faults`` in all."""

    seed: int
    rate: float = 0.2
    max_faults: int = 40
    max_per_request: int = 2
    actions: tuple[str, ...] = CHAOS_ACTIONS


@dataclass(frozen=True)
class Fault:
    identity: str
    occurrence: int
    action: str


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> str:
        return urlsplit(self.target).query

    @property
    def has_body(self) -> bool:
        return int(self.header("Content-Length") or 0) > 0 or self.header("Transfer-Encoding") is not None

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def identity(self) -> str:
        """What makes two requests "the same request" (a retry): method, masked path, part."""
        path = self.path
        path = "/<bucket>" + path[path.find("/", 1):] if path.count("/") > 1 else "/<bucket>"
        keep = sorted(f"{k}={v}" for k, v in parse_qsl(self.query, keep_blank_values=True)
                      if k in ("partNumber", "uploads", "list-type", "prefix", "delete"))
        if "uploadId=" in self.query:
            keep.append("uploadId")
        identity = f"{self.method} {path}?{'&'.join(keep)}"
        return TABLE_OID.sub("/data/<oid>.", UUID_HEX.sub("<uuid>", STAMPED.sub("<id>", identity)))


def _read_line(rfile: socket.SocketIO | object) -> bytes:
    line = rfile.readline(65537)  # type: ignore[attr-defined]
    if len(line) > 65536:
        raise ValueError("header line too long")
    return line


def _read_headers(rfile: object) -> list[tuple[str, str]]:
    headers = []
    while True:
        line = _read_line(rfile)
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))


def _read_chunked(rfile: object) -> bytes:
    raw = bytearray()
    while True:
        size_line = _read_line(rfile)
        raw += size_line
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:
                trailer = _read_line(rfile)
                raw += trailer
                if trailer in (b"\r\n", b"\n", b""):
                    return bytes(raw)
        raw += rfile.read(size + 2)  # type: ignore[attr-defined]


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (what a crashed peer or middlebox does)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _split_response(raw: bytes) -> tuple[bytes, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers, body


def _render(status_line: bytes, headers: list[tuple[str, str]]) -> bytes:
    out = [status_line]
    out += [f"{k}: {v}".encode("latin-1") for k, v in headers if k.lower() != "connection"]
    out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"


class FaultProxy:
    """``with FaultProxy(upstream_url, chaos=Chaos(seed=7)) as proxy:`` ... ``proxy.url``."""

    def __init__(self, upstream: str, rules: list[Rule] | None = None, chaos: Chaos | None = None,
                 stall_seconds: float = 3.0, on_fault: Callable[[Fault], None] | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rules = list(rules or [])
        self.chaos = chaos
        self.stall_seconds = stall_seconds
        self.on_fault = on_fault
        self.enabled = True
        self.faults: list[Fault] = []
        self.requests = 0
        self.seen: list[Request] = []
        self._occurrences: Counter[str] = Counter()
        self._streak: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(f.action for f in self.faults)

    def faults_matching(self, pattern: str) -> Iterator[Fault]:
        with self._lock:
            found = list(self.faults)
        return (f for f in found if re.search(pattern, f.identity))

    # -- the schedule ---------------------------------------------------------------------

    def _decide(self, req: Request) -> Fault | None:
        identity = req.identity()
        with self._lock:
            self.requests += 1
            self.seen.append(req)
            self._occurrences[identity] += 1
            n = self._occurrences[identity]
            if not self.enabled:
                return None
            action = self._from_rules(req) or self._from_chaos(req, identity, n)
            if action is None:
                self._streak[identity] = 0
                return None
            self._streak[identity] += 1
            fault = Fault(identity, n, action)
            self.faults.append(fault)
            return fault

    def _from_rules(self, req: Request) -> str | None:
        for rule in self.rules:
            if rule.fired >= rule.times or not rule.matches(req):
                continue
            rule.seen += 1
            if rule.seen <= rule.skip:
                continue
            rule.fired += 1
            return rule.action
        return None

    def _from_chaos(self, req: Request, identity: str, n: int) -> str | None:
        chaos = self.chaos
        if chaos is None or len(self.faults) >= chaos.max_faults:
            return None
        if self._streak[identity] >= chaos.max_per_request:
            return None
        digest = hashlib.sha256(f"{chaos.seed}\0{identity}\0{n}".encode()).digest()
        if int.from_bytes(digest[:4], "big") / 2**32 >= chaos.rate:
            return None
        eligible = [a for a in chaos.actions if self._applies(a, req)]
        if not eligible:
            return None
        return eligible[digest[4] % len(eligible)]

    @staticmethod
    def _applies(action: str, req: Request) -> bool:
        if action == "reset_upload":
            return req.has_body
        if action in ("reset_download", "truncate", "corrupt"):
            return req.method == "GET"
        return True

    # -- one connection ----------------------------------------------------------------------

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(IO_TIMEOUT)
        rfile = client.makefile("rb")
        try:
            line = _read_line(rfile)
            if not line.strip():
                client.close()
                return
            method, target, version = line.decode("latin-1").strip().split(" ", 2)
            req = Request(method, target, version, _read_headers(rfile), b"")
            fault = self._decide(req)
            action = fault.action if fault else None
            if (req.header("Expect") or "").lower() == "100-continue":
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            chunked = (req.header("Transfer-Encoding") or "").lower() == "chunked"
            length = int(req.header("Content-Length") or 0)
            if action == "reset_upload":
                rfile.read(length // 2 if length else 1)
                _reset(client)
            else:
                req.body = _read_chunked(rfile) if chunked else rfile.read(length) if length else b""
                self._answer(client, req, action)
            if fault is not None and self.on_fault is not None:
                self.on_fault(fault)
        except (OSError, ValueError):
            _reset(client)
        finally:
            rfile.close()

    def _answer(self, client: socket.socket, req: Request, action: str | None) -> None:
        if action in ERRORS:
            status, reason, code, message = ERRORS[action]
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><RequestId>faultproxy</RequestId></Error>").encode()
            if req.method == "HEAD":
                body = b""
            client.sendall(_render(f"HTTP/1.1 {status} {reason}".encode(),
                                   [("Content-Type", "application/xml"),
                                    ("Content-Length", str(len(body)))]) + body)
            client.close()
            return
        if action == "stall":
            time.sleep(self.stall_seconds)
            client.close()
            return
        raw = self._forward(req)
        if action == "lose_response":
            _reset(client)
            return
        status_line, headers, body = _split_response(raw)
        ok_body = status_line.split(b" ")[1:2] in ([b"200"], [b"206"]) and len(body) > 1
        if action in ("reset_download", "truncate") and ok_body:
            client.sendall(_render(status_line, headers) + body[:len(body) // 2])
            if action == "reset_download":
                _reset(client)
            else:
                client.shutdown(socket.SHUT_RDWR)
                client.close()
            return
        if action == "corrupt" and ok_body:
            flipped = bytearray(body)
            flipped[len(flipped) // 2] ^= 0x5A
            body = bytes(flipped)
        client.sendall(_render(status_line, headers) + body)
        client.close()

    def _forward(self, req: Request) -> bytes:
        headers = [(k, v) for k, v in req.headers if k.lower() not in ("expect", "connection")]
        head = [f"{req.method} {req.target} {req.version}".encode("latin-1")]
        head += [f"{k}: {v}".encode("latin-1") for k, v in headers]
        head.append(b"Connection: close")
        with socket.create_connection(self.upstream, timeout=IO_TIMEOUT) as up:
            up.sendall(b"\r\n".join(head) + b"\r\n\r\n" + req.body)
            chunks = []
            while data := up.recv(1 << 20):
                chunks.append(data)
        return b"".join(chunks)
