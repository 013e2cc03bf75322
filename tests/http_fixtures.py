"""A real HTTP server on 127.0.0.1 for offline download tests: serves in-memory files, scripted faults.

Usage::

    with serve({"/wikitext-2-raw-v1.zip": data}) as server:
        server.faults["/wikitext-2-raw-v1.zip"] = ["drop", "500"]   # what the next requests get
        url = server.url("/wikitext-2-raw-v1.zip")

Faults (consumed one per request, in order): `drop` (send half the body, then close the connection),
`500`/`503` (that status), `ignore-range` (answer 200 with the full body even when a Range was asked),
`stall` (wait `stall_seconds` before answering, to trip a client's read timeout), `endless` (a body
without a length that never ends, until the client hangs up).
`server.redirects[path] = location` answers every request for `path` with a 302 to `location`.
Every request is recorded in `server.requests` as (path, headers).
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the files, the fault script and the request log."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes], forbid_agent_prefix: str = "python-requests") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = dict(files)
        self.faults: dict[str, list[str]] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.forbid_agent_prefix = forbid_agent_prefix
        self.stall_seconds = 1.0

    def handle_error(self, request, client_address) -> None:
        """Stay quiet when a client leaves mid-answer (what the size-limit tests make it do); else report."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def url(self, path: str) -> str:
        """Full http://127.0.0.1:<port><path> URL of a served path."""
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def base_url(self) -> str:
        """The server root, e.g. for LLM_WIKITEXT_BASE_URL."""
        return self.url("")


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        """Keep test output quiet."""

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        """Serve a file, honouring `Range: bytes=N-` and the next scripted fault."""
        self.server.requests.append((self.path, dict(self.headers.items())))
        script = self.server.faults.get(self.path, [])
        fault = script.pop(0) if script else ""
        if fault == "stall":
            time.sleep(self.server.stall_seconds)
        agent = self.headers.get("User-Agent", "")
        if self.server.forbid_agent_prefix and agent.startswith(self.server.forbid_agent_prefix):
            return self._status(403)  # like wikitext.smerity.com
        if fault.isdigit():
            return self._status(int(fault))
        if self.path in self.server.redirects:
            self.send_response(302)
            self.send_header("Location", self.server.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if fault == "endless":
            return self._endless()
        body = self.server.files.get(self.path)
        if body is None:
            return self._status(404)
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(match.group(1)) if match and fault != "ignore-range" else 0
        if start >= len(body) and match and fault != "ignore-range":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if fault == "drop":
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return None
        self.wfile.write(payload)
        return None

    def _endless(self) -> None:
        """200 and text forever (HTTP/1.0: the body ends with the connection), until the client leaves."""
        self.send_response(200)
        self.end_headers()
        self.close_connection = True
        line = b"all work and no play makes jack a dull boy\n" * 1000
        try:
            while True:
                self.wfile.write(line)
        except OSError:  # the client hung up
            return

    def _status(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextlib.contextmanager
def serve(files: dict[str, bytes], forbid_agent_prefix: str = "python-requests") -> Iterator[FileServer]:
    """Run a FileServer on a free port in a background thread for the duration of the block."""
    server = FileServer(files, forbid_agent_prefix)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
