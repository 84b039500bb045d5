"""What the real-vLLM tests share: a raw HTTP/1.1 client that keeps the bytes exactly as they
came (head, chunk framing, body), the normalisation that makes two answers comparable (only
`id` and `created` may differ), vLLM's /metrics and log as the witnesses of what a server
did, and starting ringrouter in front of the servers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROFILE = os.environ.get("RINGROUTER_PROFILE", "debug")
BIN = ROOT / "target" / PROFILE


# ------------------------------------------------------------------------------------------
# Raw HTTP/1.1


@dataclass
class Response:
    status: int
    reason: str
    head: bytes  # status line and headers, as received
    headers: list[tuple[str, str]]
    raw_body: bytes  # as framed on the wire (chunk sizes included when chunked)
    body: bytes  # framing removed
    chunks: list[bytes] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def header_names(self) -> list[str]:
        return [n.lower() for n, _ in self.headers]

    def json(self):
        return json.loads(self.body)

    def events(self) -> list[bytes]:
        """SSE events (`data: ...` payloads) in order, comments kept as `: ...`."""
        return [e for e in self.body.split(b"\n\n") if e]


def url_addr(url: str) -> tuple[str, int]:
    hostport = url.split("://", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    return host, int(port)


def build_request(method: str, path: str, host: str, body: bytes | None = None,
                  headers: dict[str, str] | None = None, close: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        if not any(k.lower() == "content-type" for k in (headers or {})):
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Conn:
    """One HTTP/1.1 connection; `request` sends and reads one whole response."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.addr = url_addr(url)
        self.sock = socket.create_connection(self.addr, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self):
        self.sock.close()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def send(self, raw: bytes):
        self.sock.sendall(raw)

    def read_head(self) -> tuple[int, str, bytes, list[tuple[str, str]]]:
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                head, self.buf = self.buf[: i + 4], self.buf[i + 4:]
                lines = head[:-4].decode("latin-1").split("\r\n")
                _, status, *reason = lines[0].split(" ", 2)
                headers = []
                for line in lines[1:]:
                    n, v = line.split(":", 1)
                    headers.append((n, v.strip()))
                if int(status) == 100:
                    continue
                return int(status), (reason[0] if reason else ""), head, headers
            if not self._fill():
                raise ConnectionError(f"closed before a response head ({self.buf[:200]!r})")

    def read_chunk(self) -> tuple[bytes, bytes] | None:
        """One chunk: (raw framing + payload, payload); None after the last chunk."""
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed inside a chunk size line")
        i = self.buf.index(b"\r\n")
        size = int(self.buf[:i].split(b";")[0], 16)
        need = i + 2 + size + 2
        while len(self.buf) < need:
            if not self._fill():
                raise ConnectionError("closed inside a chunk")
        raw, self.buf = self.buf[:need], self.buf[need:]
        if size == 0:
            return None
        return raw, raw[i + 2: i + 2 + size]

    def request(self, raw: bytes, head_only: bool = False) -> Response:
        self.send(raw)
        status, reason, head, headers = self.read_head()
        r = Response(status, reason, head, headers, b"", b"")
        get = r.header
        if head_only or status in (204, 304):
            return r
        if (get("transfer-encoding") or "").lower() == "chunked":
            raw_parts = []
            while True:
                c = self.read_chunk()
                if c is None:
                    raw_parts.append(b"0\r\n\r\n")
                    break
                raw_parts.append(c[0])
                r.chunks.append(c[1])
            r.raw_body = b"".join(raw_parts)
            r.body = b"".join(r.chunks)
        elif get("content-length") is not None:
            n = int(get("content-length"))
            while len(self.buf) < n:
                if not self._fill():
                    raise ConnectionError("closed inside a body")
            r.body, self.buf = self.buf[:n], self.buf[n:]
            r.raw_body = r.body
        else:
            while self._fill():
                pass
            r.body, self.buf = self.buf, b""
            r.raw_body = r.body
        return r


def http(url: str, method: str, path: str, body=None, headers=None, timeout: float = 60.0) -> Response:
    """One request on a fresh connection. `body`: bytes, or an object sent as JSON."""
    if body is not None and not isinstance(body, (bytes, bytearray)):
        body = json.dumps(body).encode()
    c = Conn(url, timeout)
    try:
        host = "%s:%d" % c.addr
        return c.request(build_request(method, path, host, body, headers), head_only=method == "HEAD")
    finally:
        c.close()


def post(url: str, path: str, body, headers=None, timeout: float = 60.0) -> Response:
    return http(url, "POST", path, body, headers, timeout)


def get(url: str, path: str, headers=None, timeout: float = 60.0) -> Response:
    return http(url, "GET", path, None, headers, timeout)


# ------------------------------------------------------------------------------------------
# Making two answers comparable

_ID = re.compile(rb'"id":"(cmpl-|chatcmpl-|modelperm-|resp_|msg_)[^"]*"')
_CREATED = re.compile(rb'"(created|created_at)":\d+')


def normalise(body: bytes) -> bytes:
    """`id` and `created` (`created_at` in the Responses API) replaced, everything else kept
    byte for byte. (The patterns cannot match inside generated text: quotes there are
    escaped.)"""
    body = _ID.sub(lambda m: b'"id":"' + m.group(1) + b'ID"', body)
    return _CREATED.sub(lambda m: b'"' + m.group(1) + b'":0', body)


def normalise_value(v):
    """The same for parsed JSON (what the openai client returns as model_dump())."""
    if isinstance(v, dict):
        return {k: ("ID" if k == "id" else 0 if k == "created" else normalise_value(x))
                for k, x in v.items()}
    if isinstance(v, list):
        return [normalise_value(x) for x in v]
    return v


def canonical_stream(body: bytes) -> dict:
    """What a vLLM stream says, independent of how vLLM cut it into events. vLLM's API
    server merges several tokens into one event when it falls behind its engine, so even
    straight from vLLM the event boundaries of one request vary from run to run; this keeps
    everything else: the shapes of the events other than plain token events, in order (the
    role event, the finish events, the usage event; a token event differs from the next only
    by its text, and under load vLLM even merges all of them into the finish event), the
    whole text per choice, finish_reason, stop_reason, the final usage, the terminator."""
    events, terminator = [], None
    for raw in [e for e in body.split(b"\n\n") if e]:
        assert raw.startswith(b"data: "), raw[:100]
        payload = raw[len(b"data: "):]
        if payload == b"[DONE]":
            terminator = payload
        else:
            events.append(json.loads(payload))
    return dict(canonical_events(events), terminator=terminator)


def canonical_events(events: list[dict]) -> dict:
    """`canonical_stream` for parsed events (e.g. the openai client's chunks, dumped)."""
    shapes, texts = [], {}
    for ev in events:
        ev = normalise_value(ev)
        for ch in ev.get("choices") or []:
            i = ch.get("index", 0)
            if ch.get("text") is not None:
                texts[i] = texts.get(i, "") + ch["text"]
                ch["text"] = "T"
            delta = ch.get("delta") or {}
            if delta.get("content") is not None:
                texts[i] = texts.get(i, "") + delta["content"]
                delta["content"] = "T"
        choices = ev.get("choices") or []
        if choices and isinstance(ev.get("usage"), dict):
            # continuous_usage_stats: per-event counts depend on the cut
            ev["usage"] = {k: "N" for k in ev["usage"]}
        plain_token = choices and all(
            ch.get("finish_reason") is None and not (ch.get("delta") or {}).get("role")
            for ch in choices)
        if not plain_token:
            shapes.append(json.dumps(ev))
    return {"shapes": shapes, "texts": texts}


# Headers that differ between two answers of the same server by nature.
VOLATILE_HEADERS = {"date"}


def comparable_headers(r: Response, drop=()) -> list[tuple[str, str]]:
    skip = VOLATILE_HEADERS | {d.lower() for d in drop}
    return [(n.lower(), v) for n, v in r.headers if n.lower() not in skip]


# ------------------------------------------------------------------------------------------
# vLLM as its own witness: /metrics and its log


def metrics(url: str) -> dict[str, float]:
    """vLLM's /metrics samples, summed over label sets per `name{labels}` key and per name."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        out[key] = v
        name = key.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + v
    return out


def gauge(url: str, name: str) -> float:
    return metrics(url).get(name, 0.0)


def wait_for(pred, timeout: float, every: float = 0.05, what: str = "condition"):
    """Polls `pred` until it returns a truthy value (returned) or `timeout` s pass (raises)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        time.sleep(every)


@dataclass
class VllmServer:
    """One real vLLM server the test group may use."""

    url: str
    log: Path | None

    @property
    def port(self) -> int:
        return url_addr(self.url)[1]

    def log_text(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log is not None and self.log.exists() else 0

    def log_since(self, offset: int) -> str:
        if self.log is None:
            return ""
        with open(self.log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def saw_request(self, request_id: str, since: int = 0) -> bool:
        """Whether vLLM logged receiving the request with this X-Request-Id (needs
        `--enable-log-requests`, which the group's servers are started with)."""
        return f"-{request_id}" in self.log_since(since)


# ------------------------------------------------------------------------------------------
# ringrouter


class Router:
    """ringrouter on an ephemeral port, in front of `workers`, stopped by `stop()`."""

    def __init__(self, workers: list[str], *args: str):
        cmd = [str(BIN / "ringrouter"), "--port", "0", "--no-pin-cores", "--shards", "2",
               *(["--worker-urls", *workers] if workers else []), *args]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr_lines: list[str] = []
        self.stalls: list[float] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        deadline = time.monotonic() + 30
        self.url = None
        self.metrics_url = None  # with --prometheus-port
        while self.url is None:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(5)
                raise RuntimeError("ringrouter exited before listening:\n" + "".join(self.stderr_lines))
            if line.startswith("ringrouter metrics on "):
                self.metrics_url = line.split()[-1]
            if line.startswith("ringrouter listening on "):
                self.url = line.split()[-1]
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("ringrouter not listening in time")

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def metric(self, name: str, labels: str = "") -> float | None:
        """One sample of `GET /metrics` (`name{labels}`), None if absent."""
        base = self.metrics_url.removesuffix("/metrics")
        text = get(base, "/metrics", timeout=10).body.decode()
        want = f"{name}{{{labels}}} " if labels else f"{name} "
        for line in text.splitlines():
            if line.startswith(want):
                return float(line.split()[-1])
        return None

    def log(self) -> str:
        return "".join(self.stderr_lines)

    def loads(self) -> dict[str, dict]:
        """`GET /get_loads`, per worker URL: `load` (the router's requests in flight) and
        `reported` (what the worker last said about its load: running, waiting, KV usage).
        Asked again on a new connection if an answer takes over 10 s (once, in CI, on a host
        saturated by two vLLM servers' floods, one did; the stall is kept in `stalls`), and
        a failure says how long the router took and what it logged."""
        for attempt in range(3):
            t0 = time.monotonic()
            try:
                return {w["worker"]: w
                        for w in get(self.url, "/get_loads", timeout=10).json()["workers"]}
            except TimeoutError:
                self.stalls.append(time.monotonic() - t0)
                if attempt == 2:
                    raise AssertionError(
                        f"/get_loads unanswered 3 x 10 s; router alive: {self.proc.poll() is None}; "
                        f"its log:\n{self.log()[-4000:]}") from None
        raise AssertionError("unreachable")

    def connections_to(self, port: int) -> set[int]:
        """The router's established TCP connections to `port` on loopback, as socket inodes
        (from /proc: its file descriptors, and the kernel's TCP tables)."""
        return established_to(self.proc.pid, port)

    def workers(self) -> dict[str, dict]:
        """`GET /workers`, per worker URL (health, breaker, load)."""
        return {w["url"]: w for w in get(self.url, "/workers", timeout=10).json()["workers"]}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def established_to(pid: int, port: int) -> set[int]:
    """Socket inodes of process `pid`'s ESTABLISHED TCP connections whose remote port is
    `port` (IPv4 or IPv6)."""
    mine = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            mine.add(int(target[8:-1]))
    out = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            remote_port = int(f[2].rsplit(":", 1)[1], 16)
            # state 01: ESTABLISHED; field 9: the socket's inode
            if remote_port == port and f[3] == "01" and int(f[9]) in mine:
                out.add(int(f[9]))
    return out


def ringrouter_help() -> str:
    return subprocess.run([str(BIN / "ringrouter"), "--help"], capture_output=True, text=True).stdout


# ------------------------------------------------------------------------------------------
# A tap between the router and a worker


class Tap:
    """A plain TCP relay on 127.0.0.1 in front of `target`, recording every byte each side
    sends, per connection: what vLLM sent, to hold the router's output against (and what
    it was asked, to tell a request from the router's health checks)."""

    def __init__(self, target: str):
        self.target = url_addr(target)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.url = "http://127.0.0.1:%d" % self.lsock.getsockname()[1]
        self.received: list[bytearray] = []  # per connection, target -> router
        self.sent: list[bytearray] = []  # per connection, router -> target
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            rec, req = bytearray(), bytearray()
            with self.lock:
                self.received.append(rec)
                self.sent.append(req)
            threading.Thread(target=self._pump, args=(c, u, req), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, rec), daemon=True).start()

    def _pump(self, src, dst, rec):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if rec is not None:
                    with self.lock:
                        rec.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def responses(self, method_path: bytes | None = None) -> list[bytes]:
        """What the target sent back, per connection; with `method_path` (b"POST /v1/..."),
        only on connections whose first request was that."""
        with self.lock:
            return [bytes(r) for r, q in zip(self.received, self.sent)
                    if method_path is None or bytes(q).startswith(method_path + b" ")]

    def close(self):
        self.closed = True
        self.lsock.close()


class Flood:
    """`n` long completions sent straight to a server (past the router), read in the
    background; `close()` disconnects them all, which makes vLLM abort them. Not streamed by
    default: the tiny model generates faster than vLLM's API server can write SSE events, and
    a server busy writing them answers /metrics only after seconds. `choices` > 1 asks for that
    many sequences in each request (OpenAI's `n`): vLLM runs them side by side, so one request
    fills that many running slots at once, with no gap between arrivals (a busy vLLM API server
    on a small host may read the next connection seconds after the previous one)."""

    def __init__(self, url: str, model: str, n: int, max_tokens: int = 4000, tag: str = "flood",
                 stream: bool = False, choices: int = 1):
        self.conns = []
        self.stop = threading.Event()
        body = json.dumps({"model": model, "prompt": f"{tag} hello world", "max_tokens": max_tokens,
                           "ignore_eos": True, "stream": stream, "n": choices}).encode()
        for i in range(n):
            c = Conn(url, timeout=120)
            host = "%s:%d" % c.addr
            c.send(build_request("POST", "/v1/completions", host, body,
                                 {"X-Request-Id": f"{tag}-{i}-{time.monotonic_ns()}"}))
            self.conns.append(c)
            threading.Thread(target=self._drain, args=(c,), daemon=True).start()

    def _drain(self, c: Conn):
        try:
            while not self.stop.is_set():
                if not c.sock.recv(65536):
                    return
        except OSError:
            return

    def close(self):
        self.stop.set()
        for c in self.conns:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


# ------------------------------------------------------------------------------------------
# gRPC workers: a front end (ringrouter, or smg to judge the judges) in front of a vLLM engine
# started with `--grpc`, and a witness on that engine


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Smg:
    """smg (PyPI `smg`, the Shepherd Model Gateway) as the OpenAI front end of gRPC workers:
    `smg launch` on a free loopback port (its Prometheus listener too), ready when its
    /v1/models lists a model. The same surface as `Router` for the tests (`url`, `proc`,
    `log()`, `stop()`)."""

    def __init__(self, exe: str, workers: list[str], *args: str, timeout: float = 90.0):
        port, prom = free_port(), free_port()
        self.cmd = [exe, "launch", "--host", "127.0.0.1", "--port", str(port),
                    "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom),
                    "--log-level", "warn", "--worker-urls", *workers, *args]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=dict(os.environ, NO_COLOR="1"))
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smg exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                r = get(self.url, "/v1/models", timeout=5)
                if r.status == 200 and r.json().get("data"):
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"smg not ready in {timeout} s:\n{self.log()[-4000:]}")
            time.sleep(0.3)

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


PROBE = Path(__file__).resolve().parent / "grpc_probe.py"


class GrpcProbe:
    """The engine's own account over gRPC (GetLoads, GetServerInfo, GetModelInfo), asked
    through `grpc_probe.py` in a Python that has grpcio and smg-grpc-proto (the real-vLLM
    venv), kept running so that a poll costs a round trip, not an interpreter start."""

    def __init__(self, target: str, python: str):
        self.proc = subprocess.Popen([python, str(PROBE), target], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lock = threading.Lock()

    def ask(self, cmd: str) -> dict:
        with self.lock:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("grpc_probe.py exited: " + self.proc.stderr.read()[-2000:])
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"gRPC {cmd}: {out['error']}")
        return out

    def loads(self) -> dict:
        """{"running", "waiting": the scheduler's (GetLoads), "active": the Generate calls the
        servicer holds (GetServerInfo)}."""
        return self.ask("loads")

    def info(self) -> dict:
        return self.ask("info")

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
