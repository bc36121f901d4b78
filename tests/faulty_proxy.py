"""A fault-injecting reverse proxy for S3 tests: a threaded HTTP server on loopback in front of
the moto server that answers ``503 Service Unavailable`` (S3's "slow down, try again") to a
fraction of requests and drops the connection on another fraction, *before* forwarding them,
so a faulted request never reached the store (a retry is safe even for a conditional PUT).

    with FaultyProxy(upstream, fail=0.25, drop=0.05, seed=0) as proxy:
        opts = {**storage_options, "endpoint_url": proxy.endpoint_url}
        proxy.fail = 1.0          # change the fault rates at any time (thread-safe enough)

``proxy.counts`` says how many requests were forwarded, failed and dropped.
"""

from __future__ import annotations

import http.client
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

__all__ = ["FaultyProxy"]

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te"}
_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
              b"<Message>injected fault: please reduce your request rate</Message></Error>")


class FaultyProxy:
    def __init__(self, upstream: str, *, fail: float = 0.0, drop: float = 0.0,
                 seed: int = 0) -> None:
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.fail, self.drop = fail, drop
        self.counts = {"forwarded": 0, "failed": 0, "dropped": 0}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def decide(self) -> str:
        with self._lock:
            x = self._rng.random()
            what = ("failed" if x < self.fail else
                    "dropped" if x < self.fail + self.drop else "forwarded")
            self.counts[what] += 1
            return what

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(proxy: FaultyProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _handle(self) -> None:
            body = self._body()
            what = proxy.decide()
            if what == "dropped":
                self.close_connection = True
                self.connection.close()
                return
            if what == "failed":
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(_SLOW_DOWN)
                return
            self._forward(body)

        def _forward(self, body: bytes) -> None:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            head = self.command == "HEAD"  # a HEAD's Content-Length is the object's size
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and (head or k.lower() != "content-length"):
                    self.send_header(k, v)
            if not head:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
