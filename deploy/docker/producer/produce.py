"""Example producer for the compose setup (standard library only).

Every INTERVAL seconds it publishes one order to RabbitMQ (exchange `orders`, through the
management HTTP API) and adds one entry to the Redis stream `events` (XADD over the Redis
protocol). About one message in ten asks the receiver to fail, so retries, dead letters and the
dead-letter archive have something to show.

Applications would use a real client library, or `bosun publish`; this only keeps the example
free of dependencies.
"""

import base64
import json
import logging
import os
import random
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid

RABBIT_API = os.environ.get("RABBIT_API", "http://rabbitmq:15672/api")
RABBIT_USER = os.environ.get("RABBIT_USER", "bosun")
RABBIT_PASSWORD = os.environ.get("RABBIT_PASSWORD", "bosun")
REDIS_HOST = os.environ.get("REDIS_HOST", "redis")
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6379"))
INTERVAL = float(os.environ.get("INTERVAL", "2"))


def body(n):
    roll = random.random()
    fail = None
    if roll < 0.05:
        fail = "transient"
    elif roll < 0.08:
        fail = "permanent"
    elif roll < 0.10:
        fail = "drop"
    message = {"order": n, "amount_cents": random.randint(100, 100000)}
    if fail:
        message["fail"] = fail
    return message


def publish_amqp(n):
    """POST /api/exchanges/%2F/orders/publish; True when RabbitMQ routed it to a queue."""
    message_id = str(uuid.uuid4())
    request = {
        "properties": {
            "message_id": message_id,
            "content_type": "application/json",
            "delivery_mode": 2,
        },
        "routing_key": "order.created",
        "payload": json.dumps(body(n)),
        "payload_encoding": "string",
    }
    credentials = base64.b64encode(f"{RABBIT_USER}:{RABBIT_PASSWORD}".encode()).decode()
    req = urllib.request.Request(
        f"{RABBIT_API}/exchanges/%2F/orders/publish",
        data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {credentials}"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as response:
        routed = json.load(response).get("routed", False)
    if not routed:
        logging.warning("order %d not routed yet (bosun declares the queue when it starts)", n)
    return routed


def resp_command(*args):
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(f"${len(data)}\r\n".encode() + data + b"\r\n")
    return b"".join(out)


def xadd(n):
    message = body(n)
    with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=10) as conn:
        conn.sendall(
            resp_command(
                "XADD", "events", "MAXLEN", "~", "100000", "*",
                "message_id", str(uuid.uuid4()),
                "content_type", "application/json",
                "payload", json.dumps(message),
            )
        )
        reply = conn.recv(1024)
    if not reply.startswith(b"$"):
        raise RuntimeError(f"XADD failed: {reply!r}")


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s producer %(message)s")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    n = 0
    while True:
        n += 1
        try:
            publish_amqp(n)
            xadd(n)
            if n % 10 == 0:
                logging.info("published %d orders and %d events", n, n)
        except (OSError, urllib.error.URLError, RuntimeError, ValueError) as e:
            logging.warning("publishing message %d failed, will go on: %s", n, e)
        time.sleep(INTERVAL)


if __name__ == "__main__":
    main()
