#!/usr/bin/env python3
"""Opens N HTTP/2 connections (TLS 1.3, ALPN h2), makes one GET on each,
prints "held", keeps them idle for SECONDS, then closes them. For the idle
memory figure of bench/compare-h2.sh. Usage: h2-hold.py HOST PORT N SECONDS"""
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events

host, port, n, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["h2"])
held = []
for _ in range(n):
    s = ctx.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname="localhost")
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"),
                       (":path", "/")], end_stream=True)
    s.sendall(c.data_to_send())
    done = False
    while not done:
        data = s.recv(65536)
        if not data:
            raise SystemExit("closed before the response")
        for e in c.receive_data(data):
            if isinstance(e, h2.events.StreamEnded) and e.stream_id == 1:
                done = True
        s.sendall(c.data_to_send())
    held.append((s, c))
print("held", flush=True)
time.sleep(secs)
