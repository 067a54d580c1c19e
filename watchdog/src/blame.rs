//! Whose time ran out: the server's or the client's?
//!
//! A request's budget is the server's time. Two facts say the time went to the client instead:
//! - the kernel has not seen the request's whole head yet (`conn_flag::HEAD_PENDING` on the
//!   connection's record, read just before the step): whatever the server model, an event loop
//!   in `epoll_wait` included, nothing has been asked of the server yet;
//! - the owner thread is blocked in a read of *this request's own connection* (its syscall's
//!   descriptor is a socket whose cookie is the connection's): it waits for the client's bytes.
//!
//! Nothing else counts (blame must not become an escape hatch): a worker computing, sleeping or
//! reading any other descriptor is the server's, and so is a read of the connection of a request
//! that has no body (`GET`, `HEAD`, `OPTIONS`, `TRACE`) once its head is whole: that read waits
//! for the next request (a server that reads ahead on one thread and answers on another). Then "has the client stalled?": no byte for
//! `stall_after(budget)` (the kernel's `last_rx_ns` for an unfinished head, the socket's own
//! `tcpi_last_data_recv` for a read the owner waits in). A stalled client's connection is cut
//! (reset) and the worker is never signalled; a client still sending is left alone.
//!
//! `blame` is pure (property-tested); `owner_read` does the I/O.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use watchdog_common::{conn_flag, ConnInfo};

/// Whose time it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The server's: act as the policy says.
    Server,
    /// The client's: never signal the worker. `stalled`: nothing arrived lately (cut it).
    Client { stalled: bool },
    /// Nothing to judge by (no kernel record): act as the policy says.
    Unknown,
}

impl Blame {
    /// For records and logs: `client`, or nothing.
    pub fn label(&self) -> Option<&'static str> {
        matches!(self, Blame::Client { .. }).then_some("client")
    }
}

/// The owner thread, blocked in a read of a TCP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerRead {
    /// The socket's cookie (`SO_COOKIE`): the kernel's connection identity.
    pub cookie: u64,
    /// Milliseconds since data last arrived on it (`tcpi_last_data_recv`).
    pub idle_ms: u64,
}

/// What blame is decided on.
#[derive(Clone, Copy, Debug, Default)]
pub struct Facts {
    /// The request's connection.
    pub cookie: u64,
    /// The connection's record as the kernel has it now: `None` if it is gone.
    pub head_pending: Option<bool>,
    /// Nanoseconds since the kernel last saw bytes of an unfinished head.
    pub head_idle_ns: u64,
    /// The owner thread's read, if it is blocked in one on a TCP socket.
    pub owner_read: Option<OwnerRead>,
    /// The request has no body (HTTP/1.x `GET`, `HEAD`, `OPTIONS`, `TRACE`): once its head is
    /// whole, a read of its connection waits for the *next* request (a server that reads ahead
    /// on one thread and answers on another), not for this one's bytes.
    pub bodyless: bool,
}

/// Whether a request line (`GET /x`) names a method whose requests carry no body.
pub fn bodyless(request: Option<&str>) -> bool {
    request.is_some_and(|r| {
        ["GET ", "HEAD ", "OPTIONS ", "TRACE "]
            .iter()
            .any(|m| r.starts_with(m))
    })
}

/// A client is stalled after this long without a byte: half the budget, at most one second.
pub fn stall_after(budget: Duration) -> Duration {
    (budget / 2).min(Duration::from_secs(1))
}

/// The verdict (see the module's text).
pub fn blame(f: &Facts, stall: Duration) -> Blame {
    let stall_ms = stall.as_millis() as u64;
    let reads_ahead = f.bodyless && f.head_pending == Some(false);
    if let Some(r) = f.owner_read {
        if r.cookie == f.cookie && f.cookie != 0 && !reads_ahead {
            return Blame::Client {
                stalled: r.idle_ms >= stall_ms,
            };
        }
    }
    match f.head_pending {
        Some(true) => Blame::Client {
            stalled: f.head_idle_ns >= stall.as_nanos() as u64,
        },
        Some(false) => Blame::Server,
        None => Blame::Unknown,
    }
}

/// The facts for the request of `ev` now: `current` is its connection's record read just
/// before the step (`None`: gone), `now_ns` the monotonic clock.
pub fn facts(ev: &ConnInfo, current: Option<&ConnInfo>, now_ns: u64) -> Facts {
    let same = current.filter(|c| c.gen == ev.gen);
    Facts {
        cookie: ev.cookie,
        head_pending: same.map(|c| c.flags & conn_flag::HEAD_PENDING != 0),
        head_idle_ns: same.map_or(0, |c| now_ns.saturating_sub(c.last_rx_ns)),
        owner_read: owner_read(ev.tgid, ev.tid),
        bodyless: false,
    }
}

/// Reads of a socket, by x86-64 syscall number: read, readv, recvfrom, recvmsg, recvmmsg.
#[cfg(target_arch = "x86_64")]
const READS: [i64; 5] = [0, 19, 45, 47, 299];
#[cfg(not(target_arch = "x86_64"))]
const READS: [i64; 0] = [];

/// The descriptor thread `tid` of `pid` is blocked reading, if it is in a read syscall
/// (`/proc/PID/task/TID/syscall`: `NR arg0 ...`, `running`, or `-1 ...`).
fn read_fd(pid: u32, tid: u32) -> Option<i32> {
    let raw = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    let mut it = raw.split_whitespace();
    let nr: i64 = it.next()?.parse().ok()?;
    if !READS.contains(&nr) {
        return None;
    }
    let fd = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
    i32::try_from(fd).ok()
}

/// The socket the owner thread waits to read, through a duplicate of its descriptor
/// (`pidfd_getfd`: the same rights the diagnosis uses). `None` if it is not blocked in a read
/// of a TCP socket.
pub fn owner_read(pid: u32, tid: u32) -> Option<OwnerRead> {
    let fd = read_fd(pid, tid)?;
    let pidfd = crate::actions::pidfd_open(pid, 0).ok()?;
    // SAFETY: plain syscall; on success the return value is a new descriptor we own.
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if dup < 0 {
        return None;
    }
    // SAFETY: a freshly duplicated descriptor.
    let dup = unsafe { OwnedFd::from_raw_fd(dup as i32) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 we own, with its length.
    let r = unsafe {
        libc::getsockopt(
            dup.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            std::ptr::addr_of_mut!(cookie).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    // struct tcp_info: `tcpi_last_data_recv` (u32, ms) at byte 52.
    let mut info = [0u8; 64];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt into a buffer we own, with its length.
    let r = unsafe {
        libc::getsockopt(
            dup.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 || (len as usize) < 56 {
        return None;
    }
    let idle_ms = u32::from_ne_bytes([info[52], info[53], info[54], info[55]]);
    Some(OwnerRead {
        cookie,
        idle_ms: u64::from(idle_ms),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use watchdog_common::head::{scan_blank, BLANK_SCAN};

    use super::*;

    fn owner() -> impl Strategy<Value = Option<OwnerRead>> {
        proptest::option::of(
            (0u64..4, 0u64..3000).prop_map(|(cookie, idle_ms)| OwnerRead { cookie, idle_ms }),
        )
    }

    proptest! {
        /// Both ways: the client is blamed exactly when the owner reads this request's own
        /// connection or the head is unfinished; stalled exactly when the deciding fact's
        /// idle time reaches the threshold. Anything else is the server's (or unknown).
        #[test]
        fn client_exactly_when_own_read_or_unfinished_head(
            cookie in 1u64..4,
            pending in proptest::option::of(any::<bool>()),
            head_idle_ms in 0u64..3000,
            owner_read in owner(),
            budget_ms in 1u64..5000,
            bodyless in any::<bool>(),
        ) {
            let f = Facts { cookie, head_pending: pending, head_idle_ns: head_idle_ms * 1_000_000, owner_read, bodyless };
            let stall = stall_after(Duration::from_millis(budget_ms));
            prop_assert!(stall <= Duration::from_secs(1));
            let b = blame(&f, stall);
            // A bodyless request whose head is whole is not waiting on its own connection:
            // a read there is for the next request.
            let reads_ahead = bodyless && pending == Some(false);
            let own = owner_read.filter(|r| r.cookie == cookie && !reads_ahead);
            let client = own.is_some() || pending == Some(true);
            prop_assert_eq!(matches!(b, Blame::Client { .. }), client, "{:?}", b);
            if let Blame::Client { stalled } = b {
                let idle = match own {
                    Some(r) => Duration::from_millis(r.idle_ms),
                    None => Duration::from_millis(head_idle_ms),
                };
                prop_assert_eq!(stalled, idle >= stall);
            } else if pending.is_none() {
                prop_assert_eq!(b, Blame::Unknown);
            } else {
                prop_assert_eq!(b, Blame::Server);
            }
        }

        /// The kernel's head scan, split anywhere into reads: it finds the end of a head
        /// exactly when the bytes so far hold an empty line, wherever the reads split them.
        #[test]
        fn blank_line_found_across_any_split(
            bytes in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'a')], 0..40),
            cut in 0usize..40,
        ) {
            let cut = cut.min(bytes.len());
            let scan = |tail, part: &[u8]| {
                let mut buf = [0u8; BLANK_SCAN];
                buf[..part.len()].copy_from_slice(part);
                scan_blank(&buf, part.len(), tail)
            };
            let (first, tail) = scan(0, &bytes[..cut]);
            let found = first || scan(tail, &bytes[cut..]).0;
            let want = (1..=bytes.len()).any(|i| {
                let s = &bytes[..i];
                s.ends_with(b"\n\n") || s.ends_with(b"\n\r\n")
            });
            prop_assert_eq!(found, want);
        }
    }

    #[test]
    fn methods_without_a_body() {
        assert!(bodyless(Some("GET /slow")));
        assert!(bodyless(Some("HEAD /")));
        assert!(!bodyless(Some("POST /upload")));
        assert!(!bodyless(Some("PUT /x")));
        assert!(!bodyless(None));
    }

    #[test]
    fn interim_answers_are_not_final() {
        use watchdog_common::head::is_interim;
        let line = |s: &[u8]| -> [u8; 12] { s[..12].try_into().unwrap() };
        assert!(is_interim(&line(b"HTTP/1.1 100 Continue")));
        assert!(is_interim(&line(b"HTTP/1.1 103 Early Hints")));
        assert!(is_interim(&line(b"HTTP/1.0 102 Processing")));
        assert!(!is_interim(&line(b"HTTP/1.1 101 Switching")));
        assert!(!is_interim(&line(b"HTTP/1.1 200 OK\r\n\r\n")));
        assert!(!is_interim(&line(b"xTTP/1.1 100 Continue")));
    }
}
