//! Sans-IO watch over a client's HTTP/2 frames, for the floods the `h2`
//! crate answers but does not stop: SETTINGS and PING it must acknowledge,
//! PING acknowledgements, PRIORITY and unknown frames it ignores, empty
//! DATA and CONTINUATION frames that cost a wake each, RST_STREAM after
//! RST_STREAM. It reads only the 9-byte frame headers (RFC 9113 §4.1) of
//! the bytes h2 is handed, and
//! says when the control frames outnumber what a real client sends: a
//! fixed allowance plus ten per request (nginx and HAProxy judge the same
//! floods by frames per request).
//!
//! Resets are judged apart: a client that opens streams and resets them at
//! once (rapid reset, CVE-2023-44487) earns allowance with every HEADERS,
//! so RST_STREAM frames have their own budget of a tenth of the allowance
//! plus one per two requests. h2 itself only counts streams reset before
//! ktern accepted them, and ktern accepts at once.

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Control frames allowed per request opened, beyond the fixed allowance.
const PER_REQUEST: u64 = 10;

/// Splits a byte stream into frames (RFC 9113 §4.1) without keeping
/// them: each frame is reported once, with its header and up to the first
/// four bytes of its payload (enough for RST_STREAM's and GOAWAY's codes).
#[derive(Debug, Clone, Copy)]
struct Splitter {
    state: State,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Inside the client preface; this many bytes seen.
    Preface(usize),
    /// Reading a frame header; its bytes so far.
    Header { buf: [u8; 9], have: usize },
    /// In a payload: the frame, the first bytes, and what is left.
    Payload {
        frame: Frame,
        head: [u8; 4],
        have: usize,
        left: usize,
    },
}

/// One frame's header and payload start.
#[derive(Debug, Clone, Copy)]
struct Frame {
    ty: u8,
    flags: u8,
    len: usize,
}

const HEADER: State = State::Header {
    buf: [0; 9],
    have: 0,
};

impl Splitter {
    fn new(preface: bool) -> Splitter {
        Splitter {
            state: if preface { State::Preface(0) } else { HEADER },
        }
    }

    fn feed(&mut self, mut input: &[u8], mut each: impl FnMut(Frame, &[u8])) {
        while !input.is_empty() {
            match &mut self.state {
                State::Preface(seen) => {
                    let n = (PREFACE.len() - *seen).min(input.len());
                    *seen += n;
                    input = &input[n..];
                    if *seen == PREFACE.len() {
                        self.state = HEADER;
                    }
                }
                State::Header { buf, have } => {
                    let n = (9 - *have).min(input.len());
                    buf[*have..*have + n].copy_from_slice(&input[..n]);
                    *have += n;
                    input = &input[n..];
                    if *have == 9 {
                        let len = (usize::from(buf[0]) << 16)
                            | (usize::from(buf[1]) << 8)
                            | usize::from(buf[2]);
                        let frame = Frame {
                            ty: buf[3],
                            flags: buf[4],
                            len,
                        };
                        if len == 0 {
                            each(frame, &[]);
                            self.state = HEADER;
                        } else {
                            self.state = State::Payload {
                                frame,
                                head: [0; 4],
                                have: 0,
                                left: len,
                            };
                        }
                    }
                }
                State::Payload {
                    frame,
                    head,
                    have,
                    left,
                } => {
                    let n = (*left).min(input.len());
                    let want = frame.len.min(4);
                    if *have < want {
                        let k = (want - *have).min(n);
                        head[*have..*have + k].copy_from_slice(&input[..k]);
                        *have += k;
                        if *have == want {
                            each(*frame, &head[..want]);
                        }
                    }
                    *left -= n;
                    input = &input[n..];
                    if *left == 0 {
                        self.state = HEADER;
                    }
                }
            }
        }
    }
}

/// What the watch says after more bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing unusual.
    Fine,
    /// Control frames beyond the allowance: close with ENHANCE_YOUR_CALM.
    Flood,
}

/// Counts one connection's frames.
#[derive(Debug, Clone)]
pub struct FrameWatch {
    frames: Splitter,
    control: u64,
    resets: u64,
    requests: u64,
    allowance: u64,
}

mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;

impl FrameWatch {
    /// A watch allowing `allowance` control frames plus ten per request.
    pub fn new(allowance: u32) -> FrameWatch {
        FrameWatch {
            frames: Splitter::new(true),
            control: 0,
            resets: 0,
            requests: 0,
            allowance: u64::from(allowance),
        }
    }

    /// Control frames counted so far.
    pub fn control_frames(&self) -> u64 {
        self.control
    }

    /// Watches the next bytes the client sent.
    pub fn feed(&mut self, input: &[u8]) -> Verdict {
        let mut frames = self.frames;
        frames.feed(input, |f, _| self.count(f.ty, f.flags, f.len));
        self.frames = frames;
        if self.control > self.allowance + PER_REQUEST * self.requests
            || self.resets > self.allowance / 10 + self.requests / 2
        {
            Verdict::Flood
        } else {
            Verdict::Fine
        }
    }

    fn count(&mut self, ty: u8, flags: u8, len: usize) {
        let control = match ty {
            kind::HEADERS => {
                self.requests += 1;
                false
            }
            kind::DATA => len == 0 && flags & END_STREAM == 0,
            kind::CONTINUATION => len == 0,
            kind::SETTINGS => flags & ACK == 0,
            // An ACK too: ktern sends one PING in a connection's life (the
            // graceful GOAWAY's), and h2 answers every other ACK with a log
            // line and nothing more, so unsolicited ones flood for free.
            kind::PING => true,
            kind::RST_STREAM => {
                self.resets += 1;
                true
            }
            kind::PRIORITY => true,
            kind::WINDOW_UPDATE | kind::GOAWAY | kind::PUSH_PROMISE => false,
            // Unknown types are ignored by the receiver (§4.1): free to
            // send, so they must be bounded too.
            _ => true,
        };
        if control {
            self.control += 1;
        }
    }
}

/// Watches what ktern sends: the streams reset as malformed
/// (RST_STREAM with PROTOCOL_ERROR), whether h2 found the fault (invalid
/// or connection-specific fields, a content-length that disagrees with
/// the DATA) or ktern's own translation did.
#[derive(Debug, Clone)]
pub struct OutWatch {
    frames: Splitter,
    /// DATA payload bytes sent.
    data: u64,
}

/// RFC 9113 §7.
const PROTOCOL_ERROR: u32 = 0x1;

impl Default for OutWatch {
    fn default() -> Self {
        OutWatch {
            frames: Splitter::new(false),
            data: 0,
        }
    }
}

impl OutWatch {
    /// Watches bytes sent; returns how many streams they reset as
    /// malformed.
    pub fn feed(&mut self, output: &[u8]) -> u64 {
        let (mut malformed, mut data) = (0, 0);
        self.frames.feed(output, |f, head| {
            if f.ty == kind::DATA {
                data += f.len as u64;
            }
            if f.ty == kind::RST_STREAM && head.len() == 4 {
                let code = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                if code == PROTOCOL_ERROR {
                    malformed += 1;
                }
            }
        });
        self.data += data;
        malformed
    }

    /// DATA payload bytes sent so far (counted at each frame's start): a
    /// client's windows let them out, so it reads. (WINDOW_UPDATE frames
    /// alone say nothing: one of 13 bytes on stream 0 costs a client
    /// nothing and opens no stream's window.)
    pub fn data_sent(&self) -> u64 {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
        // (the stream id follows)
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn stream_of(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        for f in frames {
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn pings_beyond_the_allowance_are_a_flood_whatever_the_split() {
        let mut frames = vec![frame(kind::SETTINGS, 0, 0, &[])];
        for _ in 0..5 {
            frames.push(frame(kind::PING, 0, 0, &[0; 8]));
        }
        let bytes = stream_of(&frames);
        for cut in 0..bytes.len() {
            let mut w = FrameWatch::new(6);
            assert_eq!(w.feed(&bytes[..cut]), Verdict::Fine);
            assert_eq!(w.feed(&bytes[cut..]), Verdict::Fine);
            assert_eq!(w.control_frames(), 6);
            assert_eq!(w.feed(&frame(kind::PING, 0, 0, &[0; 8])), Verdict::Flood);
        }
    }

    #[test]
    fn requests_earn_allowance_and_acks_and_data_are_free() {
        let mut w = FrameWatch::new(0);
        let mut frames = vec![frame(kind::HEADERS, 0x4, 1, &[0x82])];
        for _ in 0..10 {
            frames.push(frame(kind::PRIORITY, 0, 1, &[0, 0, 0, 0, 16]));
        }
        frames.push(frame(kind::SETTINGS, ACK, 0, &[]));
        frames.push(frame(kind::DATA, END_STREAM, 1, &[]));
        frames.push(frame(kind::DATA, 0, 1, &[1, 2, 3]));
        frames.push(frame(kind::WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0]));
        assert_eq!(w.feed(&stream_of(&frames)), Verdict::Fine);
        assert_eq!(w.control_frames(), 10);
        // An empty DATA frame that does not end the stream is a control
        // frame; the eleventh is over.
        assert_eq!(w.feed(&frame(kind::DATA, 0, 1, &[])), Verdict::Flood);
    }

    /// A PING acknowledgement answers a PING ktern sent, and it sends one
    /// per connection: unsolicited ones, which h2 only logs, are counted
    /// like the PINGs a client sends.
    #[test]
    fn ping_acks_count_as_control_frames() {
        let mut w = FrameWatch::new(3);
        let ack = frame(kind::PING, ACK, 0, &[0; 8]);
        assert_eq!(
            w.feed(&stream_of(std::slice::from_ref(&ack))),
            Verdict::Fine
        );
        assert_eq!(w.feed(&[ack.clone(), ack.clone()].concat()), Verdict::Fine);
        assert_eq!(w.control_frames(), 3);
        assert_eq!(w.feed(&ack), Verdict::Flood);
    }

    #[test]
    fn rapid_reset_is_a_flood_though_each_reset_follows_a_request() {
        let mut w = FrameWatch::new(100);
        let mut verdict = Verdict::Fine;
        let mut pairs = 0;
        while verdict == Verdict::Fine && pairs < 1000 {
            pairs += 1;
            let id = 2 * pairs + 1;
            let mut bytes = frame(kind::HEADERS, 0x5, id, &[0x82]);
            bytes.extend(frame(kind::RST_STREAM, 0, id, &[0, 0, 0, 8]));
            if pairs == 1 {
                bytes = stream_of(&[bytes]);
            }
            verdict = w.feed(&bytes);
        }
        // Ten resets free, then one per two requests: the 21st pair is over.
        assert_eq!((verdict, pairs), (Verdict::Flood, 21));
    }

    #[test]
    fn sent_protocol_error_resets_are_counted_across_splits() {
        let mut bytes = frame(kind::RST_STREAM, 0, 1, &[0, 0, 0, 1]);
        bytes.extend(frame(kind::RST_STREAM, 0, 3, &[0, 0, 0, 8]));
        bytes.extend(frame(kind::DATA, 0, 5, &[0, 0, 0, 1, 9, 9]));
        bytes.extend(frame(kind::RST_STREAM, 0, 7, &[0, 0, 0, 1]));
        for cut in 0..bytes.len() {
            let mut w = OutWatch::default();
            assert_eq!(
                w.feed(&bytes[..cut]) + w.feed(&bytes[cut..]),
                2,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn large_payloads_are_skipped_not_parsed() {
        let mut w = FrameWatch::new(1);
        // A DATA payload that looks like PING frames counts nothing.
        let fake = stream_of(&[frame(kind::PING, 0, 0, &[0; 8])]);
        let bytes = stream_of(&[frame(kind::DATA, 0, 1, &fake.repeat(50))]);
        assert_eq!(w.feed(&bytes), Verdict::Fine);
        assert_eq!(w.control_frames(), 0);
    }
}
