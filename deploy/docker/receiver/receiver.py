"""Example webhook receiver for bosun's `http` handler (standard library only).

POST /messages   takes one message. The JSON body decides the answer, to show each outcome:
                   {"fail": "transient"}  -> 503: bosun retries with backoff, then dead-letters
                   {"fail": "permanent"}  -> 422: bosun dead-letters at once
                   {"fail": "drop"}       -> 200 {"status": "DROP"}: counted and discarded
                   anything else          -> 200: acknowledged
GET  /healthz    200 while running.
GET  /stats      counts per answer and per bosun consumer, as JSON.

bosun sends the message id, attempt and source in `bosun-*` request headers; a real service
would use `bosun-message-id` to skip duplicates (delivery is at-least-once).
"""

import json
import logging
import os
import signal
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1024 * 1024
STATS = Counter()
SEEN = Counter()
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server_version = "bosun-example-receiver/1"

    def _reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/healthz":
            self._reply(200, {"status": "ok"})
        elif self.path == "/stats":
            with LOCK:
                self._reply(200, {"answers": dict(STATS), "by_consumer": dict(SEEN)})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self):
        if self.path != "/messages":
            self._reply(404, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._reply(413, {"error": "body too large"})
            return
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        fail = body.get("fail") if isinstance(body, dict) else None
        consumer = self.headers.get("bosun-consumer", "?")
        logging.info(
            "message %s from %s (attempt %s, routing key %s): %s",
            self.headers.get("bosun-message-id", "?"),
            consumer,
            self.headers.get("bosun-attempt", "?"),
            self.headers.get("bosun-routing-key", "-"),
            fail or "ok",
        )
        with LOCK:
            SEEN[consumer] += 1
            STATS[fail or "ok"] += 1
        if fail == "transient":
            self._reply(503, {"error": "temporarily unavailable"})
        elif fail == "permanent":
            self._reply(422, {"error": "this message can never be processed"})
        elif fail == "drop":
            self._reply(200, {"status": "DROP"})
        else:
            self._reply(200, {"status": "ok"})

    def log_message(self, format, *args):
        # Per-request lines come from do_POST; the default access log would double them.
        pass


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s receiver %(message)s")
    port = int(os.environ.get("PORT", "8080"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    # As PID 1 in a container, SIGTERM is ignored unless handled.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    logging.info("listening on port %d", port)
    server.serve_forever()


if __name__ == "__main__":
    main()
