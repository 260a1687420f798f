"""A real HTTPS server for MTA-STS policies on 127.0.0.1 (Python's http.server + ssl, in a thread).

It answers by the request's host name (``Host`` without the port): ``server.set(host, body)``, or
any status, content type and headers (a redirect, HTML, ...). Every request is recorded as
``(host, path)``; an unknown host gets 404. The certificate is the caller's (a test CA's).
"""

from __future__ import annotations

import http.server
import ssl
import threading
from pathlib import Path

import attrs


@attrs.frozen
class Answer:
    body: bytes
    status: int = 200
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()


class PolicyServer:
    """``PolicyServer(key, chain).start()``; ``.port``, ``.set(...)``, ``.requests``;
    ``.stop()``."""

    def __init__(self, key: Path, chain: Path) -> None:
        self.answers: dict[str, Answer] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(chain), str(key))
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
                with server.lock:
                    server.requests.append((host, self.path))
                    answer = (
                        server.answers.get(host)
                        if self.path == "/.well-known/mta-sts.txt"
                        else None
                    )
                if answer is None:
                    answer = Answer(b"not found\n", status=404)
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                for name, value in answer.headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that refused our certificate: that is what some tests want

        self.httpd = Server(("127.0.0.1", 0), Handler)
        # the handshake happens in the request's thread, not in accept() on the serving thread
        self.httpd.socket = context.wrap_socket(
            self.httpd.socket, server_side=True, do_handshake_on_connect=False
        )
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> PolicyServer:
        self.thread.start()
        return self

    def set(self, host: str, body: bytes | str, **kw: object) -> None:
        data = body.encode() if isinstance(body, str) else body
        with self.lock:
            self.answers[host.lower()] = Answer(data, **kw)  # type: ignore[arg-type]

    def fetched(self, host: str) -> int:
        """How many times the policy of ``host`` was asked for."""
        with self.lock:
            return sum(1 for h, p in self.requests if h == host and p == "/.well-known/mta-sts.txt")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
