"""`--health-port`: a worker's HTTP probe for Kubernetes (or any load balancer).

GET /health answers 503 while the worker loads its model and joins the core, 200 once it
has told the core it is ready; any other path is 404. It runs on a thread of its own
(stdlib http.server), so it answers while a long step holds the worker loop, and stops
answering only when the process is gone or wedged: that makes it both the readiness and
the liveness probe.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)


class HealthServer:
    """Serves /health on `port` (all interfaces) until the process exits."""

    def __init__(self, port: int, host: str = "0.0.0.0") -> None:
        self.ready = threading.Event()
        ready = self.ready

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/health":
                    self.send_error(404)
                    return
                self.send_response(200 if ready.is_set() else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes come every few seconds: no line per probe

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="health", daemon=True).start()
        logger.info("health probe on http://%s:%d/health", host, port)

    def mark_ready(self) -> None:
        """The worker has joined the core: /health answers 200 from now on."""
        self.ready.set()
