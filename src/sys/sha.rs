//! SHA-256 and SHA-384 running states from aws-lc's low-level API, for
//! the TLS 1.3 key schedule's HMAC (`provider`).
//!
//! aws-lc-rs's `hmac` keeps an `HMAC_CTX` (three `EVP_MD_CTX` unions, about
//! 700 bytes) and copies, re-initialises and cleanses all of it for every
//! tag: about 40 k instructions of a full handshake's 1.1 M went to that
//! management, beside SHA-256's own blocks (`bench/callgrind.sh
//! --handshakes`). These states are the plain `SHA256_CTX` (112 bytes) and
//! `SHA512_CTX` (216 bytes): a keyed HMAC is two of them, and a tag copies
//! them. The blocks are hashed by the same aws-lc code as before.

use aws_lc_sys::{
    SHA256_Final, SHA256_Init, SHA256_Update, SHA384_Final, SHA384_Init, SHA384_Update, SHA256_CTX,
    SHA512_CTX,
};

/// The longest output: SHA-384's 48 bytes.
pub const MAX_OUT: usize = 48;

/// The hash a [`ShaState`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sha {
    /// SHA-256 (FIPS 180-4): 64-byte blocks, 32-byte output.
    Sha256,
    /// SHA-384 (FIPS 180-4): 128-byte blocks, 48-byte output.
    Sha384,
}

impl Sha {
    /// Bytes per block (HMAC pads its key to this, RFC 2104 §2).
    pub fn block_len(self) -> usize {
        match self {
            Sha::Sha256 => 64,
            Sha::Sha384 => 128,
        }
    }

    /// Bytes of output.
    pub fn output_len(self) -> usize {
        match self {
            Sha::Sha256 => 32,
            Sha::Sha384 => 48,
        }
    }
}

/// A context of `T` (`SHA256_CTX` or `SHA512_CTX` only), set up by its
/// `init` in place. Zeroed first: both are plain integers and bytes, for
/// which all zeros is a valid value, and `SHA384_Init` leaves the block
/// buffer as it finds it.
fn fresh<T>(init: unsafe extern "C" fn(*mut T) -> std::os::raw::c_int) -> T {
    let mut ctx = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: `T` is one of the two aws-lc SHA contexts (the callers
    // above), valid when zeroed; `ctx` is owned here and `init` sets its
    // fields in place (it returns 1).
    unsafe {
        let ok = init(ctx.as_mut_ptr());
        debug_assert_eq!(ok, 1);
        ctx.assume_init()
    }
}

/// A running hash. Cloning copies the plain struct, so a prefix absorbed
/// once (an HMAC key's padded block) is reused by cloning the state; not
/// `Copy`, so no copy of keyed state is made without saying so.
#[derive(Clone)]
pub enum ShaState {
    /// A SHA-256 state.
    S256(SHA256_CTX),
    /// A SHA-384 state (aws-lc's SHA-512 context).
    S384(SHA512_CTX),
}

impl ShaState {
    /// A fresh state for `sha`.
    pub fn new(sha: Sha) -> ShaState {
        match sha {
            Sha::Sha256 => ShaState::S256(fresh(SHA256_Init)),
            Sha::Sha384 => ShaState::S384(fresh(SHA384_Init)),
        }
    }

    /// The hash this state computes.
    pub fn sha(&self) -> Sha {
        match self {
            ShaState::S256(_) => Sha::Sha256,
            ShaState::S384(_) => Sha::Sha384,
        }
    }

    /// Absorbs `data`.
    pub fn update(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        match self {
            // SAFETY: the context is initialised (made by `new`) and owned
            // here; aws-lc reads exactly `data.len()` bytes of the live
            // slice `data`.
            ShaState::S256(ctx) => unsafe {
                SHA256_Update(ctx, data.as_ptr().cast(), data.len());
            },
            // SAFETY: as above, for the SHA-384 context.
            ShaState::S384(ctx) => unsafe {
                SHA384_Update(ctx, data.as_ptr().cast(), data.len());
            },
        }
    }

    /// The digest, in the first `output_len` bytes of `out`; returns that
    /// length. The state is wiped after (aws-lc's Final does not cleanse
    /// it: the last block, with the message's tail, stays in its buffer)
    /// and must not be used again.
    pub fn finish(&mut self, out: &mut [u8; MAX_OUT]) -> usize {
        let n = match self {
            ShaState::S256(ctx) => {
                // SAFETY: the context is initialised and owned here; `out`
                // holds 48 bytes, more than the 32 `SHA256_Final` writes.
                let ok = unsafe { SHA256_Final(out.as_mut_ptr(), ctx) };
                debug_assert_eq!(ok, 1);
                32
            }
            ShaState::S384(ctx) => {
                // SAFETY: as above; `SHA384_Final` writes 48 bytes.
                let ok = unsafe { SHA384_Final(out.as_mut_ptr(), ctx) };
                debug_assert_eq!(ok, 1);
                48
            }
        };
        self.wipe();
        n
    }

    /// Overwrites the state with zeros, so key material absorbed into it
    /// does not outlive its use (best effort: moves of any Rust value may
    /// leave copies on the stack).
    pub fn wipe(&mut self) {
        use zeroize::Zeroize;
        match self {
            ShaState::S256(ctx) => {
                ctx.h.zeroize();
                ctx.data.zeroize();
                ctx.Nl = 0;
                ctx.Nh = 0;
            }
            ShaState::S384(ctx) => {
                ctx.h.zeroize();
                ctx.p.zeroize();
                ctx.Nl = 0;
                ctx.Nh = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// FIPS 180-4 examples ("abc"), fed in two pieces, and a copy taken
    /// midway continuing independently.
    #[test]
    fn digests_match_fips_180_4_and_copies_are_independent() {
        for (sha, want) in [
            (
                Sha::Sha256,
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
            (
                Sha::Sha384,
                "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed\
                 8086072ba1e7cc2358baeca134c825a7",
            ),
        ] {
            let mut out = [0u8; MAX_OUT];
            let mut s = ShaState::new(sha);
            s.update(b"a");
            let mut copy = s.clone();
            s.update(b"bc");
            let n = s.finish(&mut out);
            assert_eq!(n, sha.output_len());
            assert_eq!(hex(&out[..n]), want);
            copy.update(b"bc");
            let mut again = [0u8; MAX_OUT];
            assert_eq!(copy.finish(&mut again), n);
            assert_eq!(out, again);
        }
    }
}
