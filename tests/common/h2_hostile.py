#!/usr/bin/env python3
"""Hostile HTTP/2 clients for tests/h2.rs, built from raw frames
(hyperframe and hpack, which come with the `h2` package) so nothing on
this side validates or repairs what is sent.

Usage: h2_hostile.py HOST PORT CASE
Prints one JSON object: what the server answered first that matters:
{"event": "goaway", "code": N} | {"event": "reset", "code": N}
| {"event": "response", "status": S} | {"event": "closed"} | {"event": "timeout"}
"""
import json
import socket
import ssl
import struct
import sys
import time

import hpack
from hyperframe.frame import (
    ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame,
    PriorityFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Conn:
    def __init__(self, host, port):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection((host, port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2", self.sock.selected_alpn_protocol()
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.buf = b""
        self.sock.sendall(PREFACE + SettingsFrame(0).serialize())

    def send(self, *frames):
        data = b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames)
        try:
            self.sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
            # The server closed mid-flood: what it said first is still
            # to be read.
            pass

    def headers(self, sid, fields, end_stream=True, raw_block=None):
        f = HeadersFrame(sid)
        f.data = raw_block if raw_block is not None else self.enc.encode(fields)
        f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        return f

    def read_frame(self, deadline):
        while True:
            if len(self.buf) >= 9:
                f, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
                if len(self.buf) >= 9 + length:
                    f.parse_body(memoryview(self.buf[9:9 + length]))
                    self.buf = self.buf[9 + length:]
                    return f
            left = deadline - time.time()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except (ConnectionResetError, ssl.SSLError, OSError):
                return "closed"
            if not chunk:
                return "closed"
            self.buf += chunk

    def outcome(self, sid=None, seconds=10):
        """The first GOAWAY, RST_STREAM on `sid`, or response on `sid`."""
        deadline = time.time() + seconds
        while True:
            f = self.read_frame(deadline)
            if f is None:
                return {"event": "timeout"}
            if f == "closed":
                return {"event": "closed"}
            if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                self.send(SettingsFrame(0, flags=["ACK"]))
            if isinstance(f, GoAwayFrame):
                return {"event": "goaway", "code": f.error_code,
                        "debug": f.additional_data.decode("latin1")}
            if isinstance(f, RstStreamFrame) and (sid is None or f.stream_id == sid):
                return {"event": "reset", "code": f.error_code}
            if isinstance(f, HeadersFrame) and (sid is None or f.stream_id == sid):
                fields = dict(self.dec.decode(f.data))
                status = int(fields[b":status"] if b":status" in fields else fields[":status"])
                if status >= 200:
                    return {"event": "response", "status": status}


def req(path="/", method="GET", extra=()):
    return [(":method", method), (":scheme", "https"), (":authority", "localhost"),
            (":path", path)] + list(extra)


def raw_block(fields):
    """An HPACK block of literal fields without indexing (RFC 7541 §6.2.2)
    with names and values as given: no lower-casing, no validation."""
    out = b""
    for name, value in fields:
        n, v = name.encode("latin1"), value.encode("latin1")
        assert len(n) < 127 and len(v) < 127
        out += b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v
    return out


def main():
    host, port, case = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    c = Conn(host, port)
    sid = 1
    if case == "ok":
        c.send(c.headers(sid, req("/ok")))
    elif case == "uppercase":
        c.send(c.headers(sid, None, raw_block=raw_block(req() + [("X-Upper", "1")])))
    elif case == "connection_field":
        c.send(c.headers(sid, req(extra=[("connection", "keep-alive")])))
    elif case == "transfer_encoding":
        c.send(c.headers(sid, req(method="POST", extra=[("transfer-encoding", "chunked")]), end_stream=False),
               DataFrame(sid, b"5\r\nhello\r\n0\r\n\r\n", flags=["END_STREAM"]))
    elif case == "crlf_value":
        c.send(c.headers(sid, None, raw_block=raw_block(req() + [("x-a", "1\r\nx-injected: 1")])))
    elif case == "nul_value":
        c.send(c.headers(sid, None, raw_block=raw_block(req() + [("x-a", "1\x00")])))
    elif case == "content_length_mismatch":
        c.send(c.headers(sid, req("/sum", "POST", [("content-length", "10")]), end_stream=False),
               DataFrame(sid, b"hello", flags=["END_STREAM"]))
    elif case == "unknown_pseudo":
        c.send(c.headers(sid, req(extra=[(":foo", "bar")])))
    elif case == "missing_path":
        c.send(c.headers(sid, [(":method", "GET"), (":scheme", "https"), (":authority", "localhost")]))
    elif case == "protocol_on_get":
        # RFC 8441 §4: :protocol only on a CONNECT.
        c.send(c.headers(sid, req("/ws", extra=[(":protocol", "websocket")]), end_stream=False))
    elif case == "connect_other_protocol":
        c.send(c.headers(sid, [(":method", "CONNECT"), (":protocol", "connect-udp"), (":scheme", "https"),
                               (":authority", "localhost"), (":path", "/x")], end_stream=False))
    elif case == "websocket_without_path":
        c.send(c.headers(sid, [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
                               (":authority", "localhost")], end_stream=False))
    elif case == "websocket_content_length":
        c.send(c.headers(sid, [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
                               (":authority", "localhost"), (":path", "/ws"), ("content-length", "5")],
                         end_stream=False))
    elif case == "data_on_stream_zero":
        # RFC 9113 §6.1: DATA on stream 0 is a connection error.
        c.send(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
        sid = None
    elif case == "bad_settings_length":
        c.send(b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x00" * 5)
    elif case == "rapid_reset":
        frames = []
        for i in range(1000):
            s = 1 + 2 * i
            frames += [c.headers(s, req("/wait/50")), RstStreamFrame(s, error_code=8)]
        c.send(*frames)
        sid = None
    elif case == "reset_while_waiting":
        # A request whose backend takes 5 s, reset while ktern waits for
        # the answer; then another request on the same connection. The
        # reset stream's work ends at the reset, not when the backend
        # answers (tests/h2.rs reads the counter right after).
        c.send(c.headers(sid, req("/sleep/5000")))
        time.sleep(0.3)
        c.send(RstStreamFrame(sid, error_code=8))
        sid = 3
        c.send(c.headers(sid, req("/ok")))
    elif case == "continuation_flood":
        first = HeadersFrame(sid)
        first.data = c.enc.encode(req())
        c.send(first)
        cont = b"".join(ContinuationFrame(sid, data=c.enc.encode([("x-pad", "a" * 100)])).serialize()
                        for _ in range(2000))
        c.send(cont)
    elif case == "settings_flood":
        c.send(b"".join(SettingsFrame(0).serialize() for _ in range(5000)))
        sid = None
    elif case == "ping_flood":
        c.send(b"".join(PingFrame(0, opaque_data=b"12345678").serialize() for _ in range(5000)))
        sid = None
    elif case == "ping_ack_flood":
        # Acknowledgements of PINGs the server never sent.
        c.send(b"".join(PingFrame(0, opaque_data=b"12345678", flags=["ACK"]).serialize()
                        for _ in range(5000)))
        sid = None
    elif case == "priority_flood":
        c.send(b"".join(PriorityFrame(3, depends_on=1, stream_weight=16).serialize() for _ in range(5000)))
        sid = None
    elif case == "empty_data_flood":
        c.send(c.headers(sid, req("/sum", "POST"), end_stream=False))
        c.send(b"".join(DataFrame(sid, b"").serialize() for _ in range(5000)))
        sid = None
    elif case in ("never_reads", "never_reads_but_nudges"):
        # A 64 MiB response to a client whose windows stay at 65535 bytes
        # (no WINDOW_UPDATE ever): the stream waits, then is cut. With
        # nudges: a WINDOW_UPDATE of 1 byte on stream 0 every 0.2 s, which
        # opens no stream's window (it reads nothing all the same).
        c.send(c.headers(sid, req("/huge")))
        seen = []
        end = time.time() + 10
        while True:
            if case == "never_reads_but_nudges":
                c.send(WindowUpdateFrame(0, window_increment=1))
            f = c.read_frame(min(end, time.time() + 0.2) if case == "never_reads_but_nudges" else end)
            if f is None and time.time() < end:
                continue
            if f is None or f == "closed":
                seen.append({"event": "timeout" if f is None else "closed"})
                print(json.dumps(seen))
                return
            # The stream is reset and the connection closed: report both.
            if isinstance(f, RstStreamFrame) and f.stream_id == sid:
                seen.append({"event": "reset", "code": f.error_code})
            if isinstance(f, GoAwayFrame):
                seen.append({"event": "goaway", "code": f.error_code})
                print(json.dumps(seen))
                return
    elif case == "trickles_window":
        # A slow read: stream windows of 1 byte (SETTINGS_INITIAL_WINDOW_SIZE),
        # each opened by 1 byte more every 0.4 s (and the connection's
        # alike), for a 64 MiB response; each opening comes well within the
        # server's send_timeout. Reports how the stream ended, then whether
        # the connection still serves another request.
        c.send(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1}),
               c.headers(sid, req("/huge")))
        end = time.time() + float(sys.argv[4])
        seen = []
        while time.time() < end and not seen:
            c.send(WindowUpdateFrame(sid, window_increment=1), WindowUpdateFrame(0, window_increment=1))
            tick = min(end, time.time() + 0.4)
            while not seen:
                f = c.read_frame(tick)
                if f is None:
                    break
                if f == "closed":
                    seen.append({"event": "closed"})
                if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                    c.send(SettingsFrame(0, flags=["ACK"]))
                if isinstance(f, RstStreamFrame) and f.stream_id == sid:
                    seen.append({"event": "reset", "code": f.error_code})
                if isinstance(f, GoAwayFrame):
                    seen.append({"event": "goaway", "code": f.error_code})
        if not seen:
            seen.append({"event": "timeout"})
        elif seen[-1]["event"] == "reset":
            c.send(c.headers(3, req("/ok")))
            seen.append(c.outcome(3))
        print(json.dumps(seen))
        return
    elif case == "silent_after_goaway":
        # Takes the server's SETTINGS and answers nothing else, the PING
        # that confirms a graceful GOAWAY (RFC 9113 §6.8) included, for
        # argv[4] seconds: whether a GOAWAY came, and whether the server
        # then closed the connection.
        deadline = time.time() + float(sys.argv[4])
        goaway = False
        while True:
            f = c.read_frame(deadline)
            if f is None or f == "closed":
                print(json.dumps({"event": "timeout" if f is None else "closed", "goaway": goaway}))
                return
            if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                c.send(SettingsFrame(0, flags=["ACK"]))
            goaway |= isinstance(f, GoAwayFrame)
    elif case == "stream_after_goaway":
        # Answers no PING, so the server's graceful GOAWAY stays open to
        # new streams (RFC 9113 §6.8), and opens a stream for argv[4] once
        # that GOAWAY came; then reads to the connection's end. Reports
        # how it ended, the response's status, whether its stream ended
        # (END_STREAM) first, and its body's length.
        deadline = time.time() + 20
        sent, status, ended, body = False, None, False, 0
        while True:
            f = c.read_frame(deadline)
            if f is None or f == "closed":
                print(json.dumps({"event": "timeout" if f is None else "closed",
                                  "status": status, "ended": ended, "body": body}))
                return
            if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                c.send(SettingsFrame(0, flags=["ACK"]))
            if isinstance(f, GoAwayFrame) and not sent:
                c.send(c.headers(sid, req(sys.argv[4])))
                sent = True
            if isinstance(f, HeadersFrame) and f.stream_id == sid and status is None:
                fields = dict(c.dec.decode(f.data))
                status = int(fields[b":status"] if b":status" in fields else fields[":status"])
            if isinstance(f, DataFrame) and f.stream_id == sid:
                body += len(f.data)
            if f.stream_id == sid and "END_STREAM" in f.flags:
                ended = True
    elif case == "streams_after_goaway":
        # Answers no PING, so the server's graceful GOAWAY names no last
        # stream, and opens a stream every 0.5 s from the first GOAWAY on,
        # for argv[4] seconds. Reports how it ended, each GOAWAY's last
        # stream id, and which streams were answered.
        deadline = time.time() + float(sys.argv[4])
        goaways, answered, next_at, sid = [], [], None, 1
        while True:
            if next_at is not None and time.time() >= next_at:
                c.send(c.headers(sid, req("/ok")))
                sid += 2
                next_at = time.time() + 0.5
            wait = deadline if next_at is None else min(deadline, next_at)
            f = c.read_frame(wait)
            if f == "closed" or (f is None and time.time() >= deadline):
                print(json.dumps({"event": "timeout" if f is None else "closed",
                                  "goaways": goaways, "answered": answered, "sent": (sid - 1) // 2}))
                return
            if f is None:
                continue
            if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                c.send(SettingsFrame(0, flags=["ACK"]))
            if isinstance(f, GoAwayFrame):
                goaways.append(f.last_stream_id)
                if next_at is None:
                    next_at = time.time()
            if isinstance(f, HeadersFrame):
                fields = dict(c.dec.decode(f.data))
                if fields.get(b":status", fields.get(":status")) in (b"200", "200"):
                    answered.append(f.stream_id)
    elif case == "stops_reading":
        # Opens every window as far as it goes, asks for 64 MiB and never
        # reads again, for argv[4] seconds: the server's writes stall in
        # the socket buffers, its GOAWAY's with them.
        wide = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1})
        c.send(wide, WindowUpdateFrame(0, window_increment=2**31 - 1 - 65535), c.headers(sid, req("/huge")))
        time.sleep(float(sys.argv[4]))
        print(json.dumps({"event": "slept"}))
        return
    elif case in ("cut_in_flight", "reset_in_flight"):
        # A request whose backend takes 5 s, then, while ktern waits for
        # the answer, a connection error (DATA on stream 0, RFC 9113 §6.1)
        # or a TCP reset (SO_LINGER 0).
        c.send(c.headers(sid, req("/sleep/5000")))
        time.sleep(0.3)
        if case == "cut_in_flight":
            c.send(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
            sid = None
        else:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.sock.close()
            print(json.dumps({"event": "reset"}))
            return
    elif case == "goaway_error":
        # The client ends the connection with GOAWAY(PROTOCOL_ERROR): its
        # complaint, not one of ktern's.
        c.send(GoAwayFrame(0, last_stream_id=0, error_code=1))
    elif case == "trickle_body":
        # A POST of 1000 bytes sent a byte every 300 ms, each well inside
        # the server's wait for the next, for at most argv[4] seconds.
        c.send(c.headers(sid, req("/sum", "POST", [("content-length", "1000")]), end_stream=False))
        until = time.time() + float(sys.argv[4])
        while time.time() < until:
            c.send(DataFrame(sid, b"x"))
            out = c.outcome(sid, seconds=0.3)
            if out["event"] != "timeout":
                print(json.dumps(out))
                return
        print(json.dumps({"event": "timeout"}))
        return
    elif case == "response_frames":
        # Not hostile: the frames of one response to GET argv[4], as "HEADERS" or
        # "DATA <length>", with "+END" on the one that ends the stream.
        c.send(c.headers(sid, req(sys.argv[4])))
        seen = []
        while True:
            f = c.read_frame(time.time() + 10)
            if f is None or f == "closed":
                seen.append("timeout" if f is None else "closed")
                break
            if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                c.send(SettingsFrame(0, flags=["ACK"]))
            if f.stream_id != sid:
                continue
            name = "HEADERS" if isinstance(f, HeadersFrame) else f"DATA {len(f.data)}" \
                if isinstance(f, DataFrame) else type(f).__name__
            seen.append(name + ("+END" if "END_STREAM" in f.flags else ""))
            if "END_STREAM" in f.flags:
                break
        print(json.dumps(seen))
        return
    else:
        raise SystemExit(f"unknown case {case}")
    print(json.dumps(c.outcome(sid)))


if __name__ == "__main__":
    main()
