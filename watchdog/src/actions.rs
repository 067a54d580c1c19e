//! Enforcement: signals through pidfds and TCP connection aborts through SOCK_DESTROY (`kill_query`
//! is `mysql.rs`).
//!
//! Every action takes a `still_valid` check that re-reads the kernel's state *after* the target
//! handle is open and *before* the action: a handle opened first can only refer to the owner or
//! to nothing, and the check proves the owner is still the live task on the same request. This
//! closes the PID-reuse race.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use nix::sys::signal::Signal;

use watchdog_common::ConnInfo;

use crate::config::Target;

/// The result of one action, as logged and counted (`result` label).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The signal was queued to the target / the connection was aborted.
    Delivered,
    /// Observe mode (or an open circuit breaker): nothing was done.
    Observed,
    /// The request had ended (or changed owner) by the time we looked: nothing was done.
    Ended,
    /// The target no longer exists.
    TargetGone,
    /// A safety rule or policy guard said no.
    Refused(&'static str),
    /// The connection was shut down through the owner's own descriptor of it (`pidfd_getfd`):
    /// the socket is outside the daemon's network namespace (a pod) or the kernel has no
    /// SOCK_DESTROY. The peer gets a FIN, not a RST.
    ShutDown,
    /// The owner is alive but holds no descriptor of the connection any more.
    NoSuchSocket,
    /// The system call failed.
    Failed(String),
    /// `kill_query`: the statement was cancelled (`KILL QUERY <id>`, in the detail).
    Killed(String),
    /// `kill_query`: no connection of the server is the request's, or it runs no statement.
    NoSuchQuery(String),
    /// `kill_query`: more than one connection matched the peer; nothing was killed.
    Ambiguous(String),
    /// `kill_query`: the server could not be reached (connect, timeout, broken connection).
    Unreachable(String),
    /// `kill_query`: the server refused the account (wrong password, missing privilege).
    AccessDenied(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Observed => "observed",
            Outcome::Ended => "ended",
            Outcome::TargetGone => "target_gone",
            Outcome::Refused(_) => "refused",
            Outcome::ShutDown => "delivered",
            Outcome::NoSuchSocket => "no_such_socket",
            Outcome::Failed(_) => "failed",
            Outcome::Killed(_) => "delivered",
            Outcome::NoSuchQuery(_) => "no_such_query",
            Outcome::Ambiguous(_) => "ambiguous",
            Outcome::Unreachable(_) => "unreachable",
            Outcome::AccessDenied(_) => "access_denied",
        }
    }

    /// What the record's `detail` says, if anything.
    pub fn detail(&self) -> Option<String> {
        match self {
            Outcome::Refused(r) => Some((*r).to_string()),
            Outcome::Failed(t)
            | Outcome::Killed(t)
            | Outcome::NoSuchQuery(t)
            | Outcome::Ambiguous(t)
            | Outcome::Unreachable(t)
            | Outcome::AccessDenied(t) => Some(t.clone()),
            Outcome::ShutDown => Some(
                "shut down through the owner's descriptor (socket outside this network namespace, or no SOCK_DESTROY)"
                    .into(),
            ),
            _ => None,
        }
    }
}

const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;

/// `pidfd_open`, falling back on the reserve descriptor when the table is full (`fds.rs`).
pub(crate) fn pidfd_open(pid: u32, flags: libc::c_uint) -> io::Result<OwnedFd> {
    crate::fds::with_reserve(|| {
        // SAFETY: plain syscall; on success the return value is a new file descriptor we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly opened descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    })
}

fn pidfd_send_signal(fd: &OwnedFd, sig: Signal) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own; no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<u8>(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn tgkill(tgid: u32, tid: u32, sig: Signal) -> io::Result<()> {
    // SAFETY: plain syscall.
    let r = unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            tgid as libc::pid_t,
            tid as libc::pid_t,
            sig as libc::c_int,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn gone_or_failed(e: io::Error) -> Outcome {
    if e.raw_os_error() == Some(libc::ESRCH) {
        Outcome::TargetGone
    } else {
        Outcome::Failed(e.to_string())
    }
}

/// The pidfds opened during one batch of actions, so that a burst of requests owned by one
/// thread or process opens one, not one per request. A pidfd names the task it was opened for
/// or nothing at all, so one opened earlier in the batch pins the target exactly as a fresh one
/// does, and `still_valid` is still read after it was opened. Cleared after each batch.
#[derive(Default)]
pub struct Pidfds(std::collections::HashMap<(u32, libc::c_uint), OwnedFd>);

/// Descriptors a batch keeps open at most; beyond it each action opens and closes its own.
const PIDFDS_KEPT: usize = 256;

impl Pidfds {
    fn open(&mut self, pid: u32, flags: libc::c_uint) -> io::Result<Pinned<'_>> {
        if self.0.contains_key(&(pid, flags)) {
            return Ok(Pinned::Kept(&self.0[&(pid, flags)]));
        }
        let fd = pidfd_open(pid, flags)?;
        if self.0.len() >= PIDFDS_KEPT {
            return Ok(Pinned::Own(fd));
        }
        Ok(Pinned::Kept(self.0.entry((pid, flags)).or_insert(fd)))
    }

    /// Closes them all (at the end of a batch).
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

/// A signal target whose pidfd this batch already holds, found before the kernel was re-read
/// for a step: a check taken after `pinned` returned it was taken after the target was pinned,
/// which is all `signal` does before sending (`signal_pinned`).
pub struct PinnedTarget {
    target: Target,
    tgid: u32,
    tid: u32,
}

/// `Some` if the pidfd `signal` would use for this target is already open in `fds`.
pub fn pinned(fds: &Pidfds, target: Target, tgid: u32, tid: u32) -> Option<PinnedTarget> {
    let key = match target {
        Target::Process => (tgid, 0),
        Target::Thread => (tid, PIDFD_THREAD),
    };
    fds.0
        .contains_key(&key)
        .then_some(PinnedTarget { target, tgid, tid })
}

/// Sends `sig` through a pidfd that was open before the caller's last `still_valid` check
/// (`pinned`), with nothing but pure decisions between that check and this call: the same
/// guarantee as `signal`, without reading the kernel a second time.
pub fn signal_pinned(fds: &mut Pidfds, pin: PinnedTarget, sig: Signal) -> Outcome {
    signal(fds, pin.target, pin.tgid, pin.tid, sig, || true)
}

enum Pinned<'a> {
    Kept(&'a OwnedFd),
    Own(OwnedFd),
}

impl Pinned<'_> {
    fn fd(&self) -> &OwnedFd {
        match self {
            Pinned::Kept(fd) => fd,
            Pinned::Own(fd) => fd,
        }
    }
}

/// Sends `sig` to the owner's thread or process, if `still_valid()` holds once the target is
/// pinned (by a pidfd of `fds`, opened now or earlier in the batch).
pub fn signal(
    fds: &mut Pidfds,
    target: Target,
    tgid: u32,
    tid: u32,
    sig: Signal,
    still_valid: impl FnOnce() -> bool,
) -> Outcome {
    match target {
        Target::Process => {
            let fd = match fds.open(tgid, 0) {
                Ok(fd) => fd,
                Err(e) => return gone_or_failed(e),
            };
            if !still_valid() {
                return Outcome::Ended;
            }
            pidfd_send_signal(fd.fd(), sig).map_or_else(gone_or_failed, |()| Outcome::Delivered)
        }
        Target::Thread => match fds.open(tid, PIDFD_THREAD) {
            Ok(fd) => {
                if !still_valid() {
                    return Outcome::Ended;
                }
                pidfd_send_signal(fd.fd(), sig).map_or_else(gone_or_failed, |()| Outcome::Delivered)
            }
            // Before Linux 6.9 there are no thread pidfds: tgkill checks that tid still belongs
            // to tgid, which with the validity check just before leaves only a microsecond window.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                if !still_valid() {
                    return Outcome::Ended;
                }
                tgkill(tgid, tid, sig).map_or_else(gone_or_failed, |()| Outcome::Delivered)
            }
            Err(e) => gone_or_failed(e),
        },
    }
}

/// Does this kernel have thread pidfds (PIDFD_THREAD, Linux 6.9+)?
pub fn thread_pidfds_supported() -> bool {
    // SAFETY: gettid has no failure mode.
    let tid = unsafe { libc::gettid() } as u32;
    pidfd_open(tid, PIDFD_THREAD).is_ok()
}

// ---------------------------------------------------------------------------------------------
// Connection abort: inet_diag SOCK_DESTROY on the exact socket (4-tuple and cookie), as `ss -K`.

const SOCK_DESTROY: u16 = 21;

#[repr(C)]
struct DestroyRequest {
    // struct nlmsghdr
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    // struct inet_diag_req_v2
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    // struct inet_diag_sockid
    sport: u16,
    dport: u16,
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

/// Aborts the connection: the owner's next call on it fails (ECONNABORTED), the peer gets a RST.
/// `still_valid` runs right before the request is sent.
pub fn reset(conn: &ConnInfo, still_valid: impl FnOnce() -> bool) -> Outcome {
    if !still_valid() {
        return Outcome::Ended;
    }
    match sock_destroy(conn) {
        Ok(()) => Outcome::Delivered,
        // Not in the daemon's network namespace (every pod has its own), or no SOCK_DESTROY in
        // this kernel (CONFIG_INET_DIAG_DESTROY off): the owner's own descriptor reaches it.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EOPNOTSUPP | libc::EINVAL)
            ) =>
        {
            shutdown_in_owner(conn)
        }
        Err(e) => Outcome::Failed(format!("SOCK_DESTROY: {e}")),
    }
}

/// `SO_COOKIE`: the socket's cookie, the connection's identity in the kernel tables.
const SO_COOKIE: libc::c_int = 57;

/// The most of the owner's sockets `shutdown_in_owner` looks at.
const MAX_WALK: usize = 4096;

/// Shuts the connection down through a duplicate of the owner's descriptor of it, found by its
/// socket cookie among the owner's sockets: the exact connection, in whatever namespace.
fn shutdown_in_owner(conn: &ConnInfo) -> Outcome {
    let pidfd = match pidfd_open(conn.tgid, 0) {
        Ok(fd) => fd,
        Err(e) => return gone_or_failed(e),
    };
    // Bounded: a server holding a million sockets is not walked on the acting thread.
    for fd in crate::diagnose::socket_fds(conn.tgid).take(MAX_WALK) {
        // SAFETY: plain syscall; on success the return value is a new descriptor we own.
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if dup < 0 {
            continue;
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
                SO_COOKIE,
                std::ptr::addr_of_mut!(cookie).cast(),
                &mut len,
            )
        };
        if r != 0 || cookie != conn.cookie {
            continue;
        }
        // SAFETY: shutdown(2) on a descriptor we own; it acts on the socket the owner shares.
        return if unsafe { libc::shutdown(dup.as_raw_fd(), libc::SHUT_RDWR) } == 0 {
            Outcome::ShutDown
        } else {
            Outcome::Failed(format!("shutdown: {}", io::Error::last_os_error()))
        };
    }
    Outcome::NoSuchSocket
}

fn sock_destroy(conn: &ConnInfo) -> io::Result<()> {
    let v4 = conn.family == libc::AF_INET as u16;
    let addr = |a: &[u8; 16]| -> [u8; 16] {
        let mut out = [0u8; 16];
        if v4 {
            out[..4].copy_from_slice(&a[12..16])
        } else {
            out = *a
        }
        out
    };
    let req = DestroyRequest {
        len: std::mem::size_of::<DestroyRequest>() as u32,
        ty: SOCK_DESTROY,
        flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        seq: 1,
        pid: 0,
        family: conn.family as u8,
        protocol: libc::IPPROTO_TCP as u8,
        ext: 0,
        pad: 0,
        states: u32::MAX,
        sport: conn.local_port.to_be(),
        dport: conn.remote_port.to_be(),
        src: addr(&conn.local_addr),
        dst: addr(&conn.remote_addr),
        ifindex: 0,
        cookie: [conn.cookie as u32, (conn.cookie >> 32) as u32],
    };
    // SAFETY: socket(2) returns a new descriptor or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The acting thread waits at most this long for the kernel's answer.
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt with a timeval we own and its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    // SAFETY: sending a fully initialised #[repr(C)] struct of the stated length.
    let sent = unsafe {
        libc::send(
            fd.as_raw_fd(),
            std::ptr::addr_of!(req).cast(),
            std::mem::size_of_val(&req),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    // SAFETY: receiving into a buffer we own.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 20 {
        return Err(io::Error::last_os_error());
    }
    // nlmsghdr (16 bytes) then, for NLMSG_ERROR, the int error code.
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    if ty == libc::NLMSG_ERROR as u16 {
        let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if err != 0 {
            return Err(io::Error::from_raw_os_error(-err));
        }
    }
    Ok(())
}

/// Can this process destroy sockets (CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY)? Tries it on a
/// loopback connection of its own.
pub fn sock_destroy_supported() -> Result<(), String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let client = std::net::TcpStream::connect(listener.local_addr().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let local = client.local_addr().map_err(|e| e.to_string())?;
    let peer = client.peer_addr().map_err(|e| e.to_string())?;
    let ip = |a: std::net::SocketAddr| match a.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    let conn = ConnInfo {
        family: libc::AF_INET as u16,
        local_addr: ip(local),
        remote_addr: ip(peer),
        local_port: local.port(),
        remote_port: peer.port(),
        cookie: u64::MAX,
        ..ConnInfo::default()
    };
    sock_destroy(&conn).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn a_pinned_target_is_signalled_through_its_batch_pidfd_and_never_after_it_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut fds = Pidfds::default();
        assert!(pinned(&fds, Target::Process, pid, pid).is_none());
        // The check runs after the pin, and says no: nothing is sent.
        assert_eq!(
            signal(&mut fds, Target::Process, pid, pid, Signal::SIGKILL, || {
                false
            }),
            Outcome::Ended
        );
        let pin = pinned(&fds, Target::Process, pid, pid).expect("pinned by the first step");
        assert!(pinned(&fds, Target::Thread, pid, pid).is_none());
        assert_eq!(
            signal_pinned(&mut fds, pin, Signal::SIGKILL),
            Outcome::Delivered
        );
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        // Reaped: its pid may be handed out again, but the batch's pidfd names the old process.
        let pin = pinned(&fds, Target::Process, pid, pid).unwrap();
        assert_eq!(
            signal_pinned(&mut fds, pin, Signal::SIGKILL),
            Outcome::TargetGone
        );
        fds.clear();
        assert!(pinned(&fds, Target::Process, pid, pid).is_none());
    }
}
