"""The one readiness loop and health probe (loraline.probe), against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import socket
import threading

from loraline.probe import http_ok, wait_until


def test_http_ok_is_true_only_for_a_200() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *_a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        assert http_ok(f"{url}/health") and not http_ok(f"{url}/other")
    finally:
        srv.shutdown()
    with socket.socket() as s:  # nothing listens there: refused, not an exception
        s.bind(("127.0.0.1", 0))
        assert not http_ok(f"http://127.0.0.1:{s.getsockname()[1]}/health", 1.0)


def test_wait_until_says_ready_gone_or_timed_out() -> None:
    calls = iter([False, False, True])
    w = wait_until(lambda: next(calls), 10, interval_s=0.01)
    assert w.ready and w.gone is None and w.seconds < 5

    w = wait_until(lambda: False, 10, interval_s=0.01, gone=lambda: "exited with status 3")
    assert not w.ready and w.gone == "exited with status 3" and w.seconds < 5  # no waiting for what is gone

    w = wait_until(lambda: False, 0.1, interval_s=0.02)
    assert not w.ready and w.gone is None and w.seconds >= 0.1
