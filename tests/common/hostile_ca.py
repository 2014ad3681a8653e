"""A hostile ACME "CA" for tests/acme.rs, over HTTPS on 127.0.0.1.

GET /dir answers a valid directory (RFC 8555 §7.1.1) and /nonce a fresh
Replay-Nonce, unless ANSWER_FILE.dir exists: then /dir answers that. Every
other request (the account, order and challenge POSTs) gets ANSWER_FILE.
Both files are re-read per request (the test rewrites them): the first
line is the status code, the rest the body.

Usage: hostile_ca.py CERT KEY ANSWER_FILE
Prints the port it listens on, then serves until killed.
"""

import http.server
import os
import sys

import test_https

cert, key, answer = sys.argv[1:4]


def read(path):
    with open(path, encoding="utf-8") as f:
        status, _, body = f.read().partition("\n")
    return int(status), body


class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self):
        base = "https://127.0.0.1:%d" % self.server.server_address[1]
        directory = '{"newNonce": "%s/nonce", "newAccount": "%s/account", "newOrder": "%s/order"}' % (
            base,
            base,
            base,
        )
        if self.path == "/dir" and os.path.exists(answer + ".dir"):
            status, body = read(answer + ".dir")
        elif self.path == "/dir":
            status, body = 200, directory
        elif self.path == "/nonce":
            status, body = 200, ""
        else:
            status, body = read(answer)
        data = body.encode()
        self.send_response(status)
        self.send_header("content-type", "application/problem+json")
        self.send_header("replay-nonce", "bm9uY2U")
        self.send_header("retry-after", "1")
        self.send_header("location", base + "/account/1")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_HEAD = do_POST = answer

    def log_message(self, *args):
        pass


test_https.serve(Handler, cert, key)
