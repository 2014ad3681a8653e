"""The HTTPS server the Python test CAs in tests/common share: 127.0.0.1
on a free port, which it prints (the tests read it), then serves until
killed."""

import http.server
import ssl


def serve(handler, cert, key):
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()
