"""ACME Renewal Information (RFC 9773) in front of pebble, which has none
(Debian's pebble 2.4.0), for tests/acme.rs, over HTTPS on 127.0.0.1.

GET /dir answers pebble's directory with "renewalInfo" added (pebble's own
URLs are kept: everything else goes to pebble directly). GET
/renewal-info/ID appends ID to STATE.asked and answers a suggested window:
one that has passed (renew at once) for the IDs listed in STATE.now, else
one 30 days ahead; Retry-After: 1, or what STATE.retry holds (a value no
client should take at face value: tests/acme.rs writes u64::MAX).

Usage: ari_ca.py CERT KEY PEBBLE_DIRECTORY STATE
Prints the port it listens on, then serves until killed.
"""

import datetime
import http.server
import json
import os
import ssl
import sys
import urllib.request

import test_https

cert, key, pebble_directory, state = sys.argv[1:5]


def stamp(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class Handler(http.server.BaseHTTPRequestHandler):
    def reply(self, status, body):
        data = json.dumps(body).encode()
        retry = "1"
        if os.path.exists(state + ".retry"):
            with open(state + ".retry", encoding="utf-8") as f:
                retry = f.read().strip()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("retry-after", retry)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        base = "https://127.0.0.1:%d" % self.server.server_address[1]
        if self.path == "/dir":
            # pebble's certificate is the one this server presents.
            ctx = ssl.create_default_context(cafile=cert)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with urllib.request.urlopen(pebble_directory, context=ctx, timeout=10) as r:
                directory = json.load(r)
            directory["renewalInfo"] = base + "/renewal-info"
            self.reply(200, directory)
        elif self.path.startswith("/renewal-info/"):
            asked = self.path[len("/renewal-info/"):]
            with open(state + ".asked", "a", encoding="utf-8") as f:
                f.write(asked + "\n")
            now_ids = []
            if os.path.exists(state + ".now"):
                with open(state + ".now", encoding="utf-8") as f:
                    now_ids = f.read().split()
            t = datetime.datetime.now(datetime.timezone.utc)
            day = datetime.timedelta(days=1)
            start, end = (t - day, t - day / 2) if asked in now_ids else (t + 30 * day, t + 31 * day)
            self.reply(200, {"suggestedWindow": {"start": stamp(start), "end": stamp(end)}})
        else:
            self.reply(404, {"type": "urn:ietf:params:acme:error:malformed"})

    def log_message(self, *args):
        pass


test_https.serve(Handler, cert, key)
