#!/usr/bin/env python3
"""Slow peers against a webhook receiver, as an attacker would try them.

Starts the receiver binary given as argument (built with
`cargo build --example receiver --features axum`) on 127.0.0.1:PORT, opens
300 connections that send their headers at 1 byte/s, 300 that send valid
signed headers and then the body at 1 byte/s, and 300 that send nothing, and
prints when the server closed each kind and how many file descriptors the
server holds at 5, 15, 35 and 65 s (Linux: it reads /proc/PID/fd).

    python3 docs/slowloris.py target/debug/examples/receiver [PORT]
"""
import base64
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import time

BINARY = sys.argv[1]
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 38411
N = 300
SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
KEY = base64.b64decode(SECRET[len("whsec_"):])


def signed_request(n):
    """The head of a validly signed request, and its body."""
    body = json.dumps({"kind": "ping", "id": f"evt_{n}", "payload": {},
                       "created_at": "2026-11-29T00:00:00Z"}).encode()
    ts = int(time.time())
    mac = hmac.new(KEY, f"evt_{n}.{ts}.".encode() + body, hashlib.sha256).digest()
    head = (f"POST /webhooks HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nwebhook-id: evt_{n}\r\n"
            f"webhook-timestamp: {ts}\r\n"
            f"webhook-signature: v1,{base64.b64encode(mac).decode()}\r\n\r\n").encode()
    return head, body


def open_connection(kind, n):
    s = socket.create_connection(("127.0.0.1", PORT))
    s.setblocking(False)
    head, body = signed_request(n)
    drip = {"headers": head, "body": body, "idle": b""}[kind]
    if kind == "body":
        s.sendall(head)
    return {"kind": kind, "s": s, "drip": drip, "closed": None, "answer": b""}


def step(c, now):
    """Reads what the server sent, then sends the next byte."""
    try:
        while True:
            data = c["s"].recv(4096)
            if not data:
                c["closed"] = now
                return
            c["answer"] += data
    except BlockingIOError:
        pass
    except ConnectionResetError:
        c["closed"] = now
        return
    if c["drip"]:
        try:
            c["s"].send(c["drip"][:1])
            c["drip"] = c["drip"][1:]
        except (BrokenPipeError, ConnectionResetError):
            c["closed"] = now


env = dict(os.environ, EVENTSINK_WEBHOOK_SECRET=SECRET,
           EVENTSINK_RECEIVER_ADDR=f"127.0.0.1:{PORT}", RUST_LOG="warn")
server = subprocess.Popen([BINARY], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
try:
    time.sleep(1.5)  # the binary binds its port
    fds = lambda: len(os.listdir(f"/proc/{server.pid}/fd"))
    print(f"server fds before: {fds()}")
    conns = [open_connection(kind, i * 3 + k)
             for k, kind in enumerate(("headers", "body", "idle")) for i in range(N)]
    start = time.time()
    print(f"after opening {len(conns)} connections: {fds()}")
    samples = {}
    for tick in range(66):
        for c in conns:
            if c["closed"] is None:
                step(c, time.time() - start)
        if tick in (5, 15, 35, 65):
            samples[tick] = fds()
        time.sleep(1)
finally:
    server.terminate()

for kind in ("headers", "body", "idle"):
    cs = [c for c in conns if c["kind"] == kind]
    closed = [c["closed"] for c in cs if c["closed"] is not None]
    answers = {}
    for c in cs:
        status = c["answer"].split(b"\r\n", 1)[0].decode(errors="replace") or "(none)"
        answers[status] = answers.get(status, 0) + 1
    span = f"first at {min(closed):.1f} s, last at {max(closed):.1f} s" if closed else "none"
    print(f"{kind}: {len(closed)}/{len(cs)} closed by the server ({span}); answers {answers}")
print("server fds at t=5/15/35/65 s:", samples)
