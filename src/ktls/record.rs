//! Sans-IO pieces of the post-handshake record layer under kTLS: what a
//! non-data record means, and how many records a key may still protect.

/// TLS record content types (RFC 8446 §5.1).
pub mod content {
    /// change_cipher_spec (TLS 1.2 only during the handshake).
    pub const CHANGE_CIPHER_SPEC: u8 = 20;
    /// alert.
    pub const ALERT: u8 = 21;
    /// handshake.
    pub const HANDSHAKE: u8 = 22;
    /// application_data.
    pub const APPLICATION_DATA: u8 = 23;
}

/// Alert descriptions we send or recognise (RFC 8446 §6).
pub mod alert {
    /// close_notify.
    pub const CLOSE_NOTIFY: u8 = 0;
    /// unexpected_message.
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    /// decode_error.
    pub const DECODE_ERROR: u8 = 50;
    /// user_canceled.
    pub const USER_CANCELED: u8 = 90;
    /// internal_error.
    pub const INTERNAL_ERROR: u8 = 80;
}

/// The bytes of a close_notify alert: warning level (1), close_notify (0).
pub const CLOSE_NOTIFY: [u8; 2] = [1, alert::CLOSE_NOTIFY];

/// A fatal alert (level 2, RFC 8446 §6) with `description`.
pub fn fatal_alert(description: u8) -> [u8; 2] {
    [2, description]
}

/// Our own KeyUpdate handshake message (RFC 8446 §4.6.3): type 24, length 1,
/// `update_requested` = 0 or 1.
pub fn key_update(request_peer_update: bool) -> [u8; 5] {
    [24, 0, 0, 1, u8::from(request_peer_update)]
}

/// What one non-application-data record received under kTLS asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Control {
    /// The peer closed its sending side cleanly (close_notify alert).
    CloseNotify,
    /// Any other alert: the peer aborted. Carries the description code.
    Alert(u8),
    /// TLS 1.3 KeyUpdate; `update_requested` means we must update our
    /// sending key too (RFC 8446 §4.6.3).
    KeyUpdate {
        /// The peer asked us to update our sending key as well.
        update_requested: bool,
    },
    /// TLS 1.3 NewSessionTicket messages from a server (we are its
    /// client): the record's whole body, one or more messages (RFC 8446
    /// §4.6.1), for [`session_tickets`] to split.
    SessionTickets,
    /// An alert that does not end the connection: TLS 1.3's
    /// user_canceled, a TLS 1.2 warning. Read on.
    Ignored,
    /// Anything else: a post-handshake message we do not accept
    /// (renegotiation ClientHello, client NewSessionTicket, …), a malformed
    /// record, or an unknown content type. Answered with `alert` and a close.
    Unexpected {
        /// Alert to send before closing.
        alert: u8,
        /// For the log line.
        what: &'static str,
    },
}

/// Classifies a record the kernel handed us with its content type.
///
/// `tls13` matters because KeyUpdate only exists in TLS 1.3; `from_server`
/// because only a server sends NewSessionTicket.
pub fn classify(record_type: u8, body: &[u8], tls13: bool, from_server: bool) -> Control {
    match record_type {
        content::ALERT => match body {
            [_, alert::CLOSE_NOTIFY] => Control::CloseNotify,
            // RFC 8446 §6.1: user_canceled comes before a close_notify
            // (JDK clients send it when they close); in TLS 1.2 a warning
            // does not end the connection (RFC 5246 §7.2). rustls ignores
            // both on the userspace path; so does the kernel path.
            [_, alert::USER_CANCELED] if tls13 => Control::Ignored,
            [1, _] if !tls13 => Control::Ignored,
            // Any other alert ends it, whatever its level (RFC 8446 §6).
            [_, desc] => Control::Alert(*desc),
            _ => Control::Unexpected {
                alert: alert::DECODE_ERROR,
                what: "malformed alert record",
            },
        },
        content::HANDSHAKE => match body {
            // A record must hold exactly one KeyUpdate: a KeyUpdate must not be
            // coalesced with other messages after it (RFC 8446 §5.1 rules on
            // key changes aligning with record boundaries).
            [24, 0, 0, 1, req @ (0 | 1)] if tls13 => Control::KeyUpdate {
                update_requested: *req == 1,
            },
            [24, ..] if tls13 => Control::Unexpected {
                alert: alert::DECODE_ERROR,
                what: "malformed KeyUpdate",
            },
            [4, ..] if tls13 && from_server => Control::SessionTickets,
            [1, ..] => Control::Unexpected {
                alert: alert::UNEXPECTED_MESSAGE,
                what: "renegotiation attempt (ClientHello after the handshake)",
            },
            _ => Control::Unexpected {
                alert: alert::UNEXPECTED_MESSAGE,
                what: "unexpected post-handshake message",
            },
        },
        _ => Control::Unexpected {
            alert: alert::UNEXPECTED_MESSAGE,
            what: "unexpected record type",
        },
    }
}

/// The payloads of the NewSessionTicket messages in a handshake record's
/// `body` (type 4, a 24-bit length, the payload; RFC 8446 §4), or `None`
/// if it holds anything else or a message runs past the record (a ticket
/// split over records is not worth joining: the session just is not
/// resumed, and ktern closes).
pub fn session_tickets(mut body: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let [4, a, b, c, rest @ ..] = body else {
            return None;
        };
        let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
        if rest.len() < len {
            return None;
        }
        let (payload, next) = rest.split_at(len);
        out.push(payload);
        body = next;
    }
    Some(out)
}

/// Counts records sealed under one key against the cipher's confidentiality
/// limit (rustls leaves this to the kTLS user, see `rustls::kernel`).
///
/// The kernel does not report record counts, so each write of `n` bytes is
/// charged the most records it can produce: ceil(n / 2^14) ≤ 1 + n / 2^14.
/// Overcounting only makes the rekey come early.
#[derive(Debug, Clone)]
pub struct RecordBudget {
    limit: u64,
    used: u64,
}

/// Records kept in reserve below the limit: room for the close_notify or the
/// KeyUpdate itself and for writes already in flight.
const RESERVE: u64 = 1 << 10;

/// Largest plaintext per record (RFC 8446 §5.1).
const MAX_FRAGMENT: u64 = 1 << 14;

impl RecordBudget {
    /// A fresh key with `limit` records allowed (u64::MAX when unbounded).
    pub fn new(limit: u64) -> RecordBudget {
        RecordBudget { limit, used: 0 }
    }

    /// A key that already sealed or opened `used` records (its sequence
    /// number when it is handed to the kernel: a connection whose records
    /// went through rustls first, `ktls_after`).
    pub fn starting_at(limit: u64, used: u64) -> RecordBudget {
        RecordBudget { limit, used }
    }

    /// Charges one write of `bytes` plaintext bytes.
    pub fn charge(&mut self, bytes: usize) {
        self.used = self.used.saturating_add(1 + bytes as u64 / MAX_FRAGMENT);
    }

    /// True once the key must be replaced (or the connection closed) before
    /// the next write.
    pub fn exhausted(&self) -> bool {
        self.used >= self.limit.saturating_sub(RESERVE)
    }

    /// Starts counting again after a key update.
    pub fn reset(&mut self) {
        self.used = 0;
    }

    /// Records charged so far.
    pub fn used(&self) -> u64 {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts() {
        assert_eq!(classify(21, &[1, 0], true, false), Control::CloseNotify);
        assert_eq!(classify(21, &[2, 40], true, false), Control::Alert(40));
        // user_canceled, then the close_notify that follows it.
        assert_eq!(classify(21, &[1, 90], true, false), Control::Ignored);
        // TLS 1.3: a warning level does not soften any other alert.
        assert_eq!(classify(21, &[1, 40], true, false), Control::Alert(40));
        // TLS 1.2: warnings are ignored, fatal alerts end it.
        assert_eq!(classify(21, &[1, 100], false, false), Control::Ignored);
        assert_eq!(classify(21, &[2, 40], false, false), Control::Alert(40));
        assert_eq!(classify(21, &[1, 0], false, false), Control::CloseNotify);
        assert!(matches!(
            classify(21, &[2], true, false),
            Control::Unexpected { .. }
        ));
        assert!(matches!(
            classify(21, &[2, 40, 1], false, false),
            Control::Unexpected { .. }
        ));
    }

    #[test]
    fn key_update_only_in_tls13() {
        assert_eq!(
            classify(22, &key_update(true), true, false),
            Control::KeyUpdate {
                update_requested: true
            }
        );
        assert_eq!(
            classify(22, &key_update(false), true, false),
            Control::KeyUpdate {
                update_requested: false
            }
        );
        assert!(matches!(
            classify(22, &key_update(true), false, false),
            Control::Unexpected { .. }
        ));
        // update_requested must be 0 or 1; a trailing message is not allowed.
        assert!(matches!(
            classify(22, &[24, 0, 0, 1, 2], true, false),
            Control::Unexpected {
                alert: alert::DECODE_ERROR,
                ..
            }
        ));
        assert!(matches!(
            classify(22, &[24, 0, 0, 1, 0, 24], true, false),
            Control::Unexpected {
                alert: alert::DECODE_ERROR,
                ..
            }
        ));
    }

    #[test]
    fn other_handshake_and_types_are_unexpected() {
        assert!(matches!(
            classify(22, &[1, 0, 0, 4, 3, 3, 0, 0], true, false),
            Control::Unexpected {
                alert: alert::UNEXPECTED_MESSAGE,
                ..
            }
        ));
        assert!(matches!(
            classify(22, &[4, 0, 0, 0], true, false),
            Control::Unexpected { .. }
        ));
        assert!(matches!(
            classify(20, &[1], true, false),
            Control::Unexpected { .. }
        ));
        assert!(matches!(
            classify(99, &[], true, false),
            Control::Unexpected { .. }
        ));
        assert!(matches!(
            classify(22, &[], true, false),
            Control::Unexpected { .. }
        ));
    }

    #[test]
    fn session_tickets_only_from_a_tls13_server_and_split_by_message() {
        let two = [4, 0, 0, 2, 0xaa, 0xbb, 4, 0, 0, 1, 0xcc];
        assert_eq!(classify(22, &two, true, true), Control::SessionTickets);
        assert!(matches!(
            classify(22, &two, false, true),
            Control::Unexpected { .. }
        ));
        assert_eq!(
            session_tickets(&two),
            Some(vec![&[0xaa, 0xbb][..], &[0xcc][..]])
        );
        // Cut short, or another message after a ticket.
        assert_eq!(session_tickets(&[4, 0, 0, 9, 1]), None);
        assert_eq!(session_tickets(&[4, 0, 0, 1, 1, 24, 0, 0, 1, 0]), None);
    }

    #[test]
    fn budget_charges_worst_case_and_keeps_reserve() {
        let mut b = RecordBudget::new(RESERVE + 10);
        b.charge(0);
        assert_eq!(b.used(), 1);
        b.charge(16384 * 3);
        assert_eq!(b.used(), 5);
        assert!(!b.exhausted());
        b.charge(16384 * 5);
        assert!(b.exhausted());
        b.reset();
        assert!(!b.exhausted());
        let mut unbounded = RecordBudget::new(u64::MAX);
        unbounded.charge(usize::MAX);
        assert!(!unbounded.exhausted());
    }
}
