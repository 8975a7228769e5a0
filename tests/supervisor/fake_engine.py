"""A stand-in engine for the supervisor tests; run as a script, never imported.

    python3 fake_engine.py --port P [--ready-after S] [--crash-after S]
                           [--grandchild] [--ignore-term] [--forward-term]

Serves ``GET /health``: 503 until ``--ready-after`` seconds have passed, then 200 with
``{"pid": ..., "grandchild": ...}``. ``--crash-after`` exits with code 3 after that
many seconds. ``--grandchild`` starts ``sleep 600`` in the same process group, to show
that a stop reaches the whole group. ``--ignore-term`` ignores SIGTERM (the grandchild
inherits that). ``--forward-term`` passes SIGTERM on to the grandchild and exits, as a
well-behaved engine with workers does. Prints one line per fact to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ready-after", type=float, default=0.0)
    p.add_argument("--crash-after", type=float, default=None)
    p.add_argument("--grandchild", action="store_true")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--forward-term", action="store_true")
    args = p.parse_args()

    started = time.monotonic()
    if args.ignore_term:
        # Set before starting the grandchild: an ignored signal stays ignored across exec.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen(["sleep", "600"]) if args.grandchild else None
    if args.forward_term:

        def forward(signum: int, frame: Any) -> None:
            if grandchild is not None:
                os.kill(grandchild.pid, signal.SIGTERM)
            os._exit(0)

        signal.signal(signal.SIGTERM, forward)
    if args.crash_after is not None:
        threading.Timer(args.crash_after, lambda: os._exit(3)).start()

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/health":
                self.send_error(404)
                return
            ready = time.monotonic() - started >= args.ready_after
            body = json.dumps(
                {"pid": os.getpid(), "grandchild": grandchild.pid if grandchild else None}
            ).encode()
            self.send_response(200 if ready else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *a: Any) -> None:
            pass  # health polls would flood the log

    server = HTTPServer((args.host, args.port), Health)
    gc = grandchild.pid if grandchild else None
    print(f"fake_engine pid={os.getpid()} port={args.port} grandchild={gc}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
