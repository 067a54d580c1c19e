//! Connection abort: inet_diag SOCK_DESTROY on the exact socket (4-tuple and cookie), as
//! `ss -K`; for a socket in another network namespace, or without SOCK_DESTROY, `shutdown` of the
//! owner's own descriptor, found by socket cookie through `pidfd_getfd` duplicates.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use watchdog_common::ConnInfo;

use super::{gone_or_failed, pidfd_open, Outcome};

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
