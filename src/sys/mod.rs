//! Every `unsafe` syscall wrapper in ktern lives here, behind safe functions
//! (and beside them the other two users of `unsafe`: `sha`, a binding, and
//! `alloc`, a counting allocator for tests).
//!
//! The rest of the crate is `#![deny(unsafe_code)]`. Each block below carries a
//! `// SAFETY:` line naming who owns the fd or buffer and why the lengths the
//! kernel sees are right. Callers pass borrowed fds (`BorrowedFd`), so an fd can
//! never be closed while a call here uses it.
#![allow(unsafe_code)]

pub mod alloc;
#[cfg(feature = "aws-lc-rs")]
pub mod sha;

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `linux/tls.h`: `setsockopt(SOL_TLS, TLS_TX)` installs the transmit keys.
const TLS_TX: libc::c_int = 1;
/// `linux/tls.h`: `setsockopt(SOL_TLS, TLS_RX)` installs the receive keys.
const TLS_RX: libc::c_int = 2;
/// `linux/tls.h`: cmsg type carrying the record type to send (`sendmsg`).
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
/// `linux/tls.h`: cmsg type carrying the record type received (`recvmsg`).
const TLS_GET_RECORD_TYPE: libc::c_int = 2;

/// Direction of a kTLS key installation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDirection {
    /// Keys the kernel encrypts with (our writes).
    Transmit,
    /// Keys the kernel decrypts with (our reads).
    Receive,
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Attaches the "tls" upper-layer protocol to a connected TCP socket
/// (`setsockopt(SOL_TCP, TCP_ULP, "tls")`). ENOENT means the kernel has no kTLS.
pub fn set_ulp_tls(fd: BorrowedFd<'_>) -> io::Result<()> {
    const NAME: &[u8] = b"tls";
    // SAFETY: `fd` is borrowed for the call, so it stays open; the kernel reads
    // exactly NAME.len() bytes from a live static slice.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            NAME.as_ptr().cast(),
            NAME.len() as libc::socklen_t,
        )
    };
    cvt(ret).map(drop)
}

/// Reads the socket's upper-layer protocol name (`getsockopt(TCP_ULP)`):
/// `"tls"` once kTLS is attached, empty otherwise. Tests use it as proof that
/// the kernel, not userspace, holds the record layer.
pub fn tcp_ulp(fd: BorrowedFd<'_>) -> io::Result<String> {
    // TCP_ULP_NAME_MAX is 16 in include/net/tcp.h.
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: `fd` is borrowed and open; the kernel writes at most `len` bytes
    // into `name`, which is exactly `len` bytes long, and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    cvt(ret)?;
    let len = (len as usize).min(name.len());
    let end = name[..len].iter().position(|&b| b == 0).unwrap_or(len);
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Installs record keys in the kernel (`setsockopt(SOL_TLS, TLS_TX|TLS_RX)`).
/// Re-installing RX/TX after a TLS 1.3 KeyUpdate needs Linux 6.13+; older
/// kernels answer EBUSY.
pub fn set_crypto_info(
    fd: BorrowedFd<'_>,
    dir: KeyDirection,
    info: &ktls::CryptoInfo,
) -> io::Result<()> {
    let name = match dir {
        KeyDirection::Transmit => TLS_TX,
        KeyDirection::Receive => TLS_RX,
    };
    // SAFETY: `fd` is borrowed and open; `info.as_ptr()` points at the
    // `tls12_crypto_info_*` struct owned by `info`, which outlives the call, and
    // `info.size()` is that struct's `size_of`, so the kernel reads within it.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_TLS,
            name,
            info.as_ptr(),
            info.size() as libc::socklen_t,
        )
    };
    cvt(ret).map(drop)
}

/// Space for one `cmsghdr` carrying a one-byte record type, 8-byte aligned as
/// `CMSG_SPACE` requires on 64-bit Linux (16-byte header + 1 byte, rounded to 24).
#[repr(C, align(8))]
struct CmsgBuf([u8; 32]);

/// Receives one record from a kTLS socket with `recvmsg`, returning the TLS
/// record type (from the `TLS_GET_RECORD_TYPE` control message; 23 when none
/// came, i.e. application data) and the number of plaintext bytes written to
/// `buf`. Never blocks (`MSG_DONTWAIT`): EAGAIN means "wait for readable".
pub fn recv_record(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(u8, usize)> {
    let mut cmsg = CmsgBuf([0; 32]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.0.len();
    // SAFETY: `fd` is borrowed and open. The kernel writes at most `iov_len`
    // bytes into `buf` (the iovec describes exactly `buf`) and at most
    // `msg_controllen` bytes into `cmsg`, both live for the call.
    let n = cvt_size(unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) })?;
    let mut record_type = 23u8;
    // SAFETY: CMSG_FIRSTHDR/NXTHDR only walk inside `msg_control` using the
    // `msg_controllen` the kernel set, which is <= the buffer we passed.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_TLS && (*c).cmsg_type == TLS_GET_RECORD_TYPE {
                record_type = *libc::CMSG_DATA(c);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((record_type, n))
}

/// One non-blocking `recv(2)` into the spare capacity of `buf`, extending
/// its length by the bytes received. `WouldBlock` when nothing is queued.
/// After a readiness wait this is one syscall, where an io_uring read
/// would be one more trip through the ring and the scheduler.
pub fn recv_spare(fd: BorrowedFd<'_>, buf: &mut Vec<u8>) -> io::Result<usize> {
    recv_upto(fd, buf, usize::MAX)
}

/// [`recv_spare`], reading at most `max` bytes (a buffer may be larger
/// than the read it is meant for: the buffer cache hands out one size).
pub fn recv_upto(fd: BorrowedFd<'_>, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    let spare = (buf.capacity() - buf.len()).min(max);
    // SAFETY: `fd` is borrowed and open. The kernel writes at most `spare`
    // bytes starting at the end of `buf`'s initialised part, which is
    // inside its allocation (capacity - len bytes are available).
    let n = cvt_size(unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().add(buf.len()).cast(),
            spare,
            libc::MSG_DONTWAIT,
        )
    })?;
    // SAFETY: the kernel initialised exactly `n <= spare` bytes after `len`.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// One non-blocking `recv(2)` straight into the unfilled part of a
/// poll-based reader's buffer (the HTTP/2 connection's), advancing it by
/// the bytes received: under kTLS the kernel decrypts into h2's own
/// buffer, with no copy in between.
pub fn recv_readbuf(fd: BorrowedFd<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> io::Result<usize> {
    // SAFETY: the kernel only writes into the slice; nothing here reads
    // the uninitialised bytes.
    let spare = unsafe { buf.unfilled_mut() };
    // SAFETY: `fd` is borrowed and open; the kernel writes at most
    // `spare.len()` bytes into the live slice `spare`.
    let n = cvt_size(unsafe {
        libc::recv(
            fd.as_raw_fd(),
            spare.as_mut_ptr().cast(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    })?;
    // SAFETY: the kernel initialised the first `n <= spare.len()` bytes.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(n)
}

/// One non-blocking gathering `sendmsg(2)` (`MSG_DONTWAIT |
/// MSG_NOSIGNAL`): how much of `bufs` the socket took, `WouldBlock` when
/// none. Under kTLS the kernel seals what it takes as records, so a frame
/// head and its payload go out together without being copied together.
pub fn send_vectored_now(fd: BorrowedFd<'_>, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // Linux takes at most UIO_MAXIOV (1024) iovecs per call.
    let bufs = &bufs[..bufs.len().min(1024)];
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is ABI-compatible with `struct iovec` (std guarantees it).
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len();
    // SAFETY: `fd` is borrowed and open; the kernel only reads the
    // iovecs, which point into live slices borrowed for this call.
    cvt_size(unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// Bytes the kernel has received on a TCP socket and nobody has read yet
/// (`ioctl(SIOCINQ)`, which is `FIONREAD`: tcp_inq; a received FIN is not
/// counted). On a kTLS
/// socket these are ciphertext: since Linux 6.0 the record parser
/// (tls_strp) leaves a partial record in TCP's queue until it is whole, and
/// the TLS ULP does not override `ioctl`, so after `recv` returned 0 a
/// non-zero count is a record cut off by the FIN.
pub fn unread_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: `fd` is borrowed and open; FIONREAD writes one int into `n`,
    // which we own.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Whether a read would find something now (data, EOF or an error such as
/// a kTLS control record's EIO), without consuming it: one non-blocking
/// `recv(MSG_PEEK)` of one byte. `false` only on `EAGAIN`.
pub fn input_pending(fd: BorrowedFd<'_>) -> bool {
    let mut byte = 0u8;
    // SAFETY: `fd` is borrowed and open; the kernel writes at most one
    // byte into `byte`, which we own.
    let r = cvt_size(unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    });
    !matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// One non-blocking `recv(MSG_PEEK)` of one byte, left queued: `Ok(0)` at
/// the end of the stream, `Ok(1)` with data next, `EAGAIN` with nothing
/// there, and on a kTLS socket `EIO` with a control record next.
pub fn peek(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut byte = 0u8;
    // SAFETY: `fd` is borrowed and open; the kernel writes at most one
    // byte into `byte`, which we own.
    cvt_size(unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    })
}

/// Sends `data` as one record of `record_type` on a kTLS socket (`sendmsg`
/// with a `TLS_SET_RECORD_TYPE` control message): alerts (21), close_notify,
/// and our own KeyUpdate (22). Never blocks (`MSG_DONTWAIT`).
pub fn send_record(fd: BorrowedFd<'_>, record_type: u8, data: &[u8]) -> io::Result<usize> {
    let mut cmsg = CmsgBuf([0; 32]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE(1) is 24 on 64-bit Linux, within the 32-byte `cmsg`;
    // CMSG_FIRSTHDR is non-null because msg_controllen >= sizeof(cmsghdr), and
    // CMSG_DATA points inside the same buffer.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(1) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_TLS;
        (*c).cmsg_type = TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as usize;
        *libc::CMSG_DATA(c) = record_type;
    }
    // SAFETY: `fd` is borrowed and open; the kernel only reads the iovec
    // (exactly `data`) and the control buffer set up above.
    cvt_size(unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// A non-blocking pipe used as the in-kernel buffer between two `splice` calls.
#[derive(Debug)]
pub struct Pipe {
    /// Read end.
    pub rx: OwnedFd,
    /// Write end.
    pub tx: OwnedFd,
}

impl Pipe {
    /// Creates a pipe with `O_NONBLOCK | O_CLOEXEC`, sized to `size` bytes when
    /// the kernel allows (`F_SETPIPE_SZ`; the default is 16 pages = 64 KiB).
    pub fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: the kernel writes two fds into `fds`, an array of two c_ints.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        if size > 0 {
            // SAFETY: `tx` is an open pipe we own; F_SETPIPE_SZ takes an int.
            // Failure (EPERM above /proc/sys/fs/pipe-max-size) keeps the default.
            let _ = unsafe { libc::fcntl(tx.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        }
        Ok(Pipe { rx, tx })
    }
}

/// Moves up to `len` bytes from `from` to `to` inside the kernel. One side must
/// be a pipe. Non-blocking on both ends (the sockets are polled by the runtime).
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are borrowed and open; null offsets mean "use the file
    // position", which is what pipes and sockets require. No user memory is
    // involved.
    cvt_size(unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    })
}

/// Borrows the fd of an object that owns it but only implements `AsRawFd`
/// (monoio's `TcpStream`).
pub fn borrow_fd<T: AsRawFd>(owner: &T) -> BorrowedFd<'_> {
    let fd: RawFd = owner.as_raw_fd();
    // SAFETY: `owner` owns `fd` and closes it only when dropped; the returned
    // BorrowedFd carries `owner`'s borrow lifetime, so it cannot outlive it.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Whether an idle pooled connection is still usable: a non-blocking
/// `recv(MSG_PEEK)` sees EAGAIN on a healthy idle socket, 0 once the peer
/// closed, and data (an unsolicited response) when it must not be reused.
pub fn idle_socket_usable(fd: BorrowedFd<'_>) -> bool {
    let mut byte = 0u8;
    // SAFETY: `fd` is borrowed and open; the kernel writes at most one byte
    // into `byte`, and MSG_PEEK leaves it queued.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

/// `pread(2)` of up to `max` bytes of `file` at `offset`, appended to
/// `buf` without zeroing the room first (a `resize` before a read zeroed
/// every byte of a static file once more: 3.4% of ktern's CPU serving 1 MiB
/// files). Returns the bytes read; 0 at the end of the file.
pub fn pread_append(
    file: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    offset: u64,
    max: usize,
) -> io::Result<usize> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    buf.reserve(max);
    let room = buf.spare_capacity_mut();
    let want = max.min(room.len());
    // SAFETY: `file` is borrowed and open; `room` is `buf`'s spare capacity,
    // at least `want` bytes long, and the kernel writes at most `want` bytes
    // into it (through a raw pointer: no reference to the uninitialised
    // bytes is made).
    let n = unsafe { libc::pread(file.as_raw_fd(), room.as_mut_ptr().cast(), want, off) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised the first `n` (<= `want`) bytes of the
    // spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// `sendfile(2)`: up to `count` bytes of `file` from `*offset` to `sock`,
/// advancing `*offset`. On a kTLS socket the kernel seals the records
/// (TLS_TX supports sendfile since Linux 4.13); the file bytes never enter
/// userspace. The socket is non-blocking, so a full send buffer is
/// `WouldBlock`.
pub fn sendfile(
    sock: BorrowedFd<'_>,
    file: BorrowedFd<'_>,
    offset: &mut u64,
    count: usize,
) -> io::Result<usize> {
    let mut off =
        libc::off_t::try_from(*offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: both fds are borrowed and open; `off` is a live local the
    // kernel reads and updates; no user buffer is involved.
    let n =
        cvt_size(unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut off, count) })?;
    *offset = off as u64;
    Ok(n)
}

/// `openat2(2)` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`: opens the
/// relative `path` under the directory `dir`, and fails (`EXDEV`) if any
/// step of the resolution — `..`, an absolute or magic symlink, a symlink
/// pointing outside — would leave it. The kernel does the check during the
/// open itself, so nothing can be swapped in between (Linux 5.6+; `ENOSYS`
/// before).
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    path: &std::path::Path,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is plain old data; all-zero is "no mode, no resolve flags".
    let mut how: libc::open_how = unsafe { MaybeUninit::zeroed().assume_init() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `dir` is borrowed and open; `c_path` is a NUL-terminated string
    // and `how` a live open_how, both outliving the call, and the size passed
    // is exactly `how`'s size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_path.as_ptr(),
            &how as *const libc::open_how,
            size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 succeeded, so `fd` is a new open descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// One non-blocking `write(2)` (used to push a stray plaintext record into a pipe).
pub fn write_fd(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `fd` is borrowed and open; the kernel reads at most `data.len()`
    // bytes from the live slice `data`.
    cvt_size(unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) })
}

/// One non-blocking `send(2)` (`MSG_DONTWAIT | MSG_NOSIGNAL`): how much of
/// `data` the socket buffer took, `WouldBlock` when none.
pub fn send_now(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `fd` is borrowed and open; the kernel reads at most
    // `data.len()` bytes from the live slice `data`.
    cvt_size(unsafe {
        libc::send(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// One TCP connection used by its two directions at once through a single
/// fd (issue 12: a `dup` per direction halved the connections an fd limit
/// allows). The read side only waits for readiness and reads with
/// `recv`; the write side submits io_uring sends. This is monoio's own
/// split (`monoio::io::Splitable`), without the `shutdown(SHUT_WR)` its
/// write half does when dropped: a side's drop only releases its share, and
/// the socket closes with the last one, as a `dup` did.
///
/// The socket is made non-blocking: the sides' own syscalls (`splice`,
/// kTLS control records) must never block the shard, and io_uring
/// accepts and connects hand out blocking sockets.
pub fn split_stream(stream: monoio::net::TcpStream) -> io::Result<(ReadSide, WriteSide)> {
    set_nonblocking(borrow_fd(&stream))?;
    let shared = std::rc::Rc::new(std::cell::UnsafeCell::new(stream));
    Ok((ReadSide(shared.clone()), WriteSide(shared)))
}

/// Sets O_NONBLOCK with one `ioctl(FIONBIO)`: `fcntl` would take two
/// calls (F_GETFL, then F_SETFL), and every proxied connection sets it on
/// two sockets.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut on: libc::c_int = 1;
    // SAFETY: `fd` is borrowed and open; FIONBIO reads one `int` from `on`,
    // a live local.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONBIO, &mut on) })?;
    Ok(())
}

/// Clears O_NONBLOCK (`ioctl(FIONBIO)`, as [`set_nonblocking`] sets it):
/// for a file opened non-blocking only so that the open could not block
/// (a FIFO with no reader), whose writes should wait.
pub fn set_blocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut on: libc::c_int = 0;
    // SAFETY: `fd` is borrowed and open; FIONBIO reads one `int` from `on`,
    // a live local.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONBIO, &mut on) })?;
    Ok(())
}

/// The reading direction of a [`split_stream`] socket: readiness and the fd.
pub struct ReadSide(std::rc::Rc<std::cell::UnsafeCell<monoio::net::TcpStream>>);

/// The writing direction of a [`split_stream`] socket.
pub struct WriteSide(std::rc::Rc<std::cell::UnsafeCell<monoio::net::TcpStream>>);

impl ReadSide {
    /// The stream, for readiness waits (`readable`) and the fd.
    pub fn get(&self) -> &monoio::net::TcpStream {
        // SAFETY: both sides live on one thread (`Rc` is !Send) and neither
        // moves, replaces or drops the stream while the other holds it. A
        // `TcpStream`'s methods only clone its Rc'd fd handle when they
        // submit an operation, so a readiness wait here and a send in flight
        // on the write side never touch the same data mutably: the contract
        // monoio states for `TcpStream` with `unsafe impl Split` and relies
        // on in its own `into_split`.
        unsafe { &*self.0.get() }
    }
}

impl WriteSide {
    /// The stream, for readiness waits (`writable`) and the fd.
    pub fn get(&self) -> &monoio::net::TcpStream {
        // SAFETY: as in `ReadSide::get`.
        unsafe { &*self.0.get() }
    }

    /// The stream, for monoio's writes (which take `&mut`). Only the write
    /// side writes, and there is one write side.
    pub fn get_mut(&mut self) -> &mut monoio::net::TcpStream {
        // SAFETY: as in `ReadSide::get`: the read side never writes, and a
        // write only clones the stream's fd handle into its operation.
        unsafe { &mut *self.0.get() }
    }
}

impl AsRawFd for ReadSide {
    fn as_raw_fd(&self) -> RawFd {
        self.get().as_raw_fd()
    }
}

impl AsRawFd for WriteSide {
    fn as_raw_fd(&self) -> RawFd {
        self.get().as_raw_fd()
    }
}

/// About how many bytes the socket's send buffer takes now without
/// blocking: half of what `SO_SNDBUF` leaves beside the bytes queued
/// (`SIOCOUTQ`, the same ioctl number as `TIOCOUTQ`). Half, because the
/// kernel charges buffers by their true size (headers, skb overhead), more
/// than the payload the queue count shows.
pub fn send_room(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let sndbuf = socket2::SockRef::from(&fd).send_buffer_size()?;
    let mut queued: libc::c_int = 0;
    // SAFETY: `fd` is borrowed and open; SIOCOUTQ writes one int into
    // `queued`, which we own.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) })?;
    Ok(sndbuf.saturating_sub(usize::try_from(queued).unwrap_or(0)) / 2)
}

/// Makes the socket's close send a reset, not a FIN (`SO_LINGER` on, 0 s;
/// unsent bytes are dropped): for a peer that must not read the close as
/// the end of a complete stream.
pub fn reset_on_close(fd: BorrowedFd<'_>) -> io::Result<()> {
    socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO))
}

/// Half-closes the write side of a socket (`shutdown(SHUT_WR)`): the peer reads EOF.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is borrowed and open; shutdown touches no user memory.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) }).map(drop)
}

/// Raises this process's open-file soft limit to its hard limit (each
/// proxied connection holds two fds, see tuning.md). Returns (soft, hard).
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct into `lim`, which we own.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads the struct we pass.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Sets both open-file limits to `n` (needs CAP_SYS_RESOURCE to raise the
/// hard limit; the benchmark tool uses it as root inside the VM).
pub fn set_nofile_limit(n: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }).map(drop)
}

/// Opts this process, and every process it starts from now on, out of
/// transparent huge pages (`PR_SET_THP_DISABLE`, Linux 3.15: inherited by
/// fork and kept across execve). The tests that bound ktern's memory per
/// connection start ktern under it: with THP `always` (Debian's kernels, the
/// kTLS VM's among them) khugepaged collapses any 2 MiB range that has one
/// page present into a huge page on its own schedule, which moves a few
/// MiB's measurement by 2 MiB (CI once saw 1,400 bytes per connection of it).
pub fn disable_transparent_huge_pages() -> io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches
    // no memory of ours.
    cvt(unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) }).map(drop)
}

/// Resident set size of process `pid` in bytes (`VmRSS` in /proc/PID/status).
pub fn rss_of(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmRSS"))
}

/// Resident set size of this process in bytes, from `/proc/self/statm`.
pub fn rss_bytes() -> io::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad /proc/self/statm"))?;
    // SAFETY: sysconf reads no user memory.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * page as u64)
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd's
/// `RELOADING=1`/`MONOTONIC_USEC=` notification is measured on (std's
/// `Instant` does not expose its raw value).
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which we own;
    // CLOCK_MONOTONIC always exists on Linux, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Most fds sent in one `SCM_RIGHTS` message (the kernel's SCM_MAX_FD is
/// 253).
pub const MAX_FDS_PER_MESSAGE: usize = 250;

/// Sends `data` with `fds` attached (`SCM_RIGHTS`) on a unix stream socket:
/// the receiver gets its own descriptors for the same open sockets.
pub fn send_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE || data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad fd message",
        ));
    }
    let payload = fds.len() * size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64 elements keep the buffer aligned for cmsghdr.
    let mut cmsg = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `cmsg` holds CMSG_SPACE(payload) bytes, so the first
        // header and its `payload` data bytes lie inside it; the fds are
        // copied as plain ints (unaligned write: CMSG_DATA's alignment is
        // that of the header, which is enough, but be safe).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            let data = libc::CMSG_DATA(c).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `sock` is borrowed and open; the kernel reads `data` (the
    // iovec describes exactly it) and the control buffer built above, and
    // duplicates the fds, which stay open (borrowed) for the call.
    let n = cvt_size(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) })?;
    if n != data.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short fd message"));
    }
    Ok(())
}

/// Receives one message into `buf` with up to `max` attached fds
/// (`SCM_RIGHTS`), which the caller then owns (closed on drop). Blocks
/// unless the socket is non-blocking.
pub fn recv_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let max = max.min(MAX_FDS_PER_MESSAGE);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((max * size_of::<RawFd>()) as u32) } as usize;
    let mut cmsg = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `sock` is borrowed and open; the kernel writes at most
    // `buf.len()` bytes into `buf` and `space` bytes into `cmsg`.
    // MSG_CMSG_CLOEXEC: the fds are not inherited by anything we exec.
    let n = cvt_size(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) })?;
    let mut fds = Vec::new();
    // SAFETY: CMSG_FIRSTHDR/NXTHDR walk inside `msg_control` using the
    // `msg_controllen` the kernel set; each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / 4 fds that the kernel installed in this
    // process for us, so taking ownership of each is sound.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..bytes / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "fds truncated"));
    }
    Ok((n, fds))
}

/// This thread's CPU time so far (`CLOCK_THREAD_CPUTIME_ID`: exact to the
/// call, where `/proc/thread-self/schedstat` of a running thread lags by up
/// to a scheduler tick). Under qemu's `-icount shift=0` a ns is one guest
/// instruction (bench/vm-handshake.sh).
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a
    // constant every Linux supports (2.6.12+).
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(ret, 0, "CLOCK_THREAD_CPUTIME_ID");
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Waits up to `timeout_ms` for `fd` to be readable (`poll(2)`); `false`
/// on timeout.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own; `fd` is borrowed and open.
    let n = cvt(unsafe { libc::poll(&mut pfd, 1, timeout_ms) })?;
    Ok(n > 0)
}

/// Moves the calling thread into the network namespace `name` (made by
/// `ip netns add`, so it is bound at /run/netns/NAME). Only this thread
/// and the threads it starts afterwards see the namespace's network
/// stack. For the fleet test, which runs clients and hosts in namespaces.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{name}"))?;
    // SAFETY: `file` is an open namespace fd for the duration of the call;
    // setns reads no user memory.
    cvt(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }).map(drop)
}

/// Returns freed heap memory to the kernel (glibc `malloc_trim(0)`: every
/// arena, free pages released with `madvise`). glibc keeps what a flood of
/// connections freed in its per-thread arenas otherwise. Process-wide; it
/// locks each arena in turn while it works.
pub fn trim_heap() {
    // SAFETY: malloc_trim takes no pointers; glibc serialises it with the
    // arenas' own locks, so it is safe from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `CLOCK_MONOTONIC_COARSE`: the monotonic clock as of the last timer
/// tick (4 ms here: `CONFIG_HZ=250`), read from the vDSO without reading
/// the TSC: 5.7 ns a call on this project's host, against 19.6 ns for
/// `CLOCK_MONOTONIC` (`Instant::now`). `None` if the kernel refuses it
/// (it has had it since 2.6.32).
pub fn monotonic_coarse() -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec for the call's duration;
    // clock_gettime writes only into it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc != 0 {
        return None;
    }
    Some(std::time::Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// Is this process running with effective uid 0?
pub fn is_root() -> bool {
    // SAFETY: geteuid reads no user memory and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// One `get*nam_r(3)` lookup: the record for `name`, or `NotFound`. The
/// record's string fields point into a buffer that is gone on return, so
/// callers take only its numeric fields.
///
/// # Safety
/// `T` must be the C record `call` fills (`passwd`, `group`): plain data
/// for which all-zero bytes are a valid value.
unsafe fn nss_lookup<T>(
    what: &str,
    name: &str,
    buf_len: usize,
    call: unsafe extern "C" fn(
        *const libc::c_char,
        *mut T,
        *mut libc::c_char,
        libc::size_t,
        *mut *mut T,
    ) -> libc::c_int,
) -> io::Result<T> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("NUL in {what} name")))?;
    // A record larger than the buffer (a directory group with thousands
    // of members) is ERANGE: the buffer doubles, up to a bound no real
    // record reaches (glibc's own getgrnam grows its buffer the same way).
    const MAX_BUF: usize = 64 << 20;
    let mut buf = vec![0u8; buf_len.max(1)];
    // SAFETY: the caller guarantees all-zero is a valid T (see above);
    // `call` overwrites it on success.
    let mut record: T = unsafe { MaybeUninit::zeroed().assume_init() };
    let mut result: *mut T = std::ptr::null_mut();
    loop {
        // SAFETY: every pointer is to memory we own for the call's
        // duration, and `buf.len()` is the buffer's real size; the function
        // writes strings into `buf`, the record into `record`, and sets
        // `result` to `&record` or null.
        let rc = unsafe {
            call(
                cname.as_ptr(),
                &mut record,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 => break,
            libc::EINTR => {}
            libc::ERANGE if buf.len() < MAX_BUF => buf.resize(buf.len() * 2, 0),
            _ => return Err(io::Error::from_raw_os_error(rc)),
        }
    }
    if result.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no {what} {name:?}"),
        ));
    }
    Ok(record)
}

/// (uid, primary gid) of the user `name`, from the passwd database.
pub fn lookup_user(name: &str) -> io::Result<(u32, u32)> {
    // SAFETY: passwd is the plain C record getpwnam_r fills.
    let pwd = unsafe { nss_lookup("user", name, 16 << 10, libc::getpwnam_r)? };
    Ok((pwd.pw_uid, pwd.pw_gid))
}

/// The gid of the group `name`, from the group database (a large group's
/// member list needs a large buffer).
pub fn lookup_group(name: &str) -> io::Result<u32> {
    // SAFETY: group is the plain C record getgrnam_r fills.
    Ok(unsafe { nss_lookup("group", name, 64 << 10, libc::getgrnam_r)? }.gr_gid)
}

/// Whether this process may change its user and groups: CAP_SETUID (7)
/// and CAP_SETGID (6) in its effective set (`CapEff` in
/// /proc/self/status). Root in a container that drops them cannot, and
/// learns it before binding anything rather than after its shards took
/// connections.
pub fn can_change_ids() -> bool {
    const SETGID: u64 = 1 << 6;
    const SETUID: u64 = 1 << 7;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (SETGID | SETUID) == SETGID | SETUID)
}

/// Drops root for good: supplementary groups to just `gid`, then gid, then
/// uid (in that order: after setuid the others are no longer allowed).
/// glibc applies each change to every thread of the process.
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setgroups reads one gid from a local we own; setgid and
    // setuid read no user memory.
    unsafe {
        cvt(libc::setgroups(1, &gid))?;
        cvt(libc::setgid(gid))?;
        cvt(libc::setuid(uid))?;
    }
    Ok(())
}

/// Whether [`drop_privileges`] to (`uid`, `gid`) would succeed, tried in
/// a child process so that nothing here changes. Capabilities alone do not
/// say it: in a user namespace an unmapped id is EINVAL, and `setgroups`
/// may be denied. A binary upgrade asks before it tells the old process to
/// drain, so a switch that fails refuses the upgrade instead of leaving
/// neither process serving.
pub fn try_privileges(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: after fork in a multi-threaded process the child may only
    // make async-signal-safe calls: it makes raw system calls (no glibc
    // wrapper that broadcasts to threads it no longer has), reads errno
    // and `_exit`s, touching no lock and no allocation.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see above; `gid` is a local of this frame, copied into
        // the child.
        unsafe {
            let groups = [gid];
            let failed = libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setgid, gid) != 0
                || libc::syscall(libc::SYS_setuid, uid) != 0;
            libc::_exit(if failed { *libc::__errno_location() } else { 0 })
        }
    }
    cvt(pid)?;
    let mut status = 0;
    loop {
        // SAFETY: `status` is a local the call writes one int into.
        match cvt(unsafe { libc::waitpid(pid, &mut status, 0) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        break;
    }
    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0) => Ok(()),
        (true, errno) => Err(io::Error::from_raw_os_error(errno)),
        _ => Err(io::Error::other("the trial switch's child did not exit")),
    }
}

const _: () = assert!(size_of::<libc::cmsghdr>() + 8 <= 32);

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::path::Path;

    /// A record larger than the first buffer (a directory group with
    /// thousands of members) is found, not refused with ERANGE: here a
    /// one-byte buffer, which no record fits.
    #[test]
    fn user_and_group_records_larger_than_the_buffer_are_found() {
        // SAFETY: group and passwd are the records these functions fill.
        let group = unsafe { nss_lookup("group", "root", 1, libc::getgrnam_r) }.unwrap();
        assert_eq!(group.gr_gid, 0);
        // SAFETY: as above.
        let user = unsafe { nss_lookup("user", "root", 1, libc::getpwnam_r) }.unwrap();
        assert_eq!((user.pw_uid, user.pw_gid), (0, 0));
        assert_eq!(lookup_group("root").unwrap(), 0);
        let missing = lookup_group("ktern-no-such-group").unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound, "{missing}");
    }

    /// The thread's CPU clock counts this thread's work, not wall time: a
    /// sleep adds (next to) nothing, a busy loop adds its time.
    #[test]
    fn thread_cpu_time_counts_this_threads_work() {
        let t0 = thread_cpu_time();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let slept = thread_cpu_time() - t0;
        assert!(slept < std::time::Duration::from_millis(100), "{slept:?}");
        let start = std::time::Instant::now();
        let t1 = thread_cpu_time();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(
            thread_cpu_time() > t1,
            "a busy loop of 50 ms added no CPU time"
        );
    }

    #[test]
    fn open_beneath_refuses_every_way_out() {
        let base = std::env::temp_dir().join(format!("ktern-beneath-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a"), b"a").unwrap();
        std::fs::write(base.join("outside"), b"secret").unwrap();
        let _ = std::os::unix::fs::symlink(base.join("outside"), root.join("abs-link"));
        let _ = std::os::unix::fs::symlink("../outside", root.join("rel-link"));
        let _ = std::os::unix::fs::symlink("sub/a", root.join("inside-link"));
        let dir = std::fs::File::open(&root).unwrap();
        match open_beneath(dir.as_fd(), Path::new("sub/a"), libc::O_RDONLY) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                eprintln!("openat2 unavailable on this kernel; the O_NOFOLLOW fallback applies");
                return;
            }
            r => assert!(r.is_ok(), "{r:?}"),
        }
        assert!(open_beneath(dir.as_fd(), Path::new("inside-link"), libc::O_RDONLY).is_ok());
        for out in ["abs-link", "rel-link", "../outside", "sub/../../outside"] {
            let e = open_beneath(dir.as_fd(), Path::new(out), libc::O_RDONLY).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{out}: {e}");
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
