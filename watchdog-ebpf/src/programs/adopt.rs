//! Connections that were open before their port was watched (a daemon started on a node where
//! the servers already run, a reload that watches a new port): taken into tracking by a TCP
//! socket iterator the daemon runs, not at accept.
//!
//! - `conn_adopt` (`iter/tcp`) visits every TCP socket of the reader's network namespace, with
//!   the socket locked. An established one whose local port has its own `PORTS` entry and that
//!   is not tracked yet gets its record and state through `connection::track`, as an accept
//!   would, flagged adopted, generation 0, idle: its next bytes in start a request. A request
//!   already in flight is not guessed at (its start is unknown).
//! - sock_ops can ask for a socket's state changes only from its own callbacks, which an
//!   adopted socket never passes again: `conn_adopted_state` (tp_btf `inet_sock_set_state`)
//!   sees its peer FIN and close instead, and acts only on sockets flagged adopted.
//! - Syscall set: a process follows a connection only once it is in `OWNERS`. `owners_adopt`
//!   (`iter/task_file`) visits every open file of every task and adds the holders of tracked
//!   sockets.
//!
//! None of this is on the recv/send path: the untracked floor does not move.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT, BPF_TCP_ESTABLISHED},
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel, bpf_skc_to_tcp_sock},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use watchdog_common::{stat, ConnInfo};

use crate::{
    maps::{
        count, offsets, port_config, sock_state, syscall_set, OWNERS, SOCK_ADOPTED, SOCK_STATES,
    },
    programs::connection::{addr, state_changed, track, AF_INET},
};

/// `iter/tcp`: `struct bpf_iter__tcp { struct bpf_iter_meta *meta; struct sock_common
/// *sk_common; uid_t uid; }`, one call per socket (and one with a null socket at the end).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn conn_adopt(ctx: *mut c_void) -> i32 {
    // SAFETY: the iterator's context; `sk_common` is its second word (a direct context load
    // at a constant offset, as the verifier requires).
    let skc: *mut c_void = unsafe { ptr::read_volatile(ctx.cast::<*mut c_void>().add(1)) };
    if skc.is_null() {
        return 0;
    }
    // Full TCP sockets only (not a request or time-wait socket); the verifier then knows the
    // pointer as a socket that socket storage accepts.
    // SAFETY: helper call on the iterator's socket pointer.
    let sk = unsafe { bpf_skc_to_tcp_sock(skc) }.cast::<c_void>();
    if !sk.is_null() {
        adopt(sk);
    }
    0
}

/// Takes `sk` into tracking if it is an established connection on a port with its own `PORTS`
/// entry and not tracked yet. The wildcard entry (every port) adopts nothing: an established
/// socket does not say whether it was accepted or connected, and a client's connection must
/// not be taken for a server's.
#[inline(always)]
fn adopt(sk: *mut c_void) {
    let o = offsets();
    let at = |off: u32| (sk as *const u8).wrapping_add(off as usize);
    if read::<u8>(at(o.skc_state)) != Some(BPF_TCP_ESTABLISHED as u8) {
        return;
    }
    let Some(local_port) = read::<u16>(at(o.skc_num)) else {
        return;
    };
    let Some((index, cfg)) = port_config(u32::from(local_port)) else {
        return;
    };
    if index == 0 {
        return;
    }
    // SAFETY: helper call on a socket pointer the verifier typed.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    if !sock_state(sk, || cookie).is_null() {
        return;
    }
    let (Some(family), Some(dport)) = (read::<u16>(at(o.skc_family)), read::<u16>(at(o.skc_dport)))
    else {
        return;
    };
    let family = u32::from(family);
    let (mut l4, mut r4, mut l6, mut r6) = (0, 0, [0u32; 4], [0u32; 4]);
    if family == AF_INET {
        l4 = read::<u32>(at(o.skc_rcv_saddr)).unwrap_or(0);
        r4 = read::<u32>(at(o.skc_daddr)).unwrap_or(0);
    } else {
        l6 = read::<[u32; 4]>(at(o.skc_v6_rcv_saddr)).unwrap_or([0; 4]);
        r6 = read::<[u32; 4]>(at(o.skc_v6_daddr)).unwrap_or([0; 4]);
    }
    let info = ConnInfo {
        cookie,
        local_addr: addr(family, l4, l6),
        remote_addr: addr(family, r4, r6),
        local_port,
        remote_port: u16::from_be(dport),
        slot: cfg.slot as u16,
        family: family as u16,
        ..ConnInfo::default()
    };
    track(sk, &info, cfg.slot, true);
}

/// `inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`: a peer FIN or a
/// close of an adopted connection (accepted ones are seen by sock_ops' state callback).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn conn_adopted_state(ctx: BtfTracePointContext) -> u32 {
    let new_state: i32 = ctx.arg(2);
    let new_state = new_state as u32;
    if new_state != BPF_TCP_CLOSE_WAIT && new_state != BPF_TCP_CLOSE {
        return 0;
    }
    let sk: *mut c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's typed socket pointer.
    let st = sock_state(sk, || unsafe { bpf_get_socket_cookie(sk) });
    if st.is_null() {
        return 0;
    }
    // SAFETY: non-null storage pointer.
    let st = unsafe { &mut *st };
    if st.flags & SOCK_ADOPTED != 0 {
        state_changed(st, new_state);
    }
    0
}

/// `iter/task_file`: `struct bpf_iter__task_file { struct bpf_iter_meta *meta; struct
/// task_struct *task; u32 fd; struct file *file; }`. Syscall set: the process holding a tracked
/// socket joins `OWNERS` (an accept would have put it there).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn owners_adopt(ctx: *mut c_void) -> i32 {
    if !syscall_set() {
        return 0;
    }
    // SAFETY: the iterator's context: `task` is its second word, `file` its fourth.
    let (task, file) = unsafe {
        let words = ctx.cast::<*const u8>();
        (
            ptr::read_volatile(words.add(1)),
            ptr::read_volatile(words.add(3)),
        )
    };
    if task.is_null() || file.is_null() {
        return 0;
    }
    let o = offsets();
    // `file->private_data` is a `struct socket` only for socket files; the back pointer
    // `socket->sk->sk_socket == socket` rejects every other kind of file.
    let Some(socket) = read::<*const u8>(file.wrapping_add(o.file_private_data as usize)) else {
        return 0;
    };
    let Some(sk) = read::<*const u8>(socket.wrapping_add(o.socket_sk as usize)) else {
        return 0;
    };
    if read::<*const u8>(sk.wrapping_add(o.sock_socket as usize)) != Some(socket) {
        return 0;
    }
    let Some(cookie) = read::<u64>(sk.wrapping_add(o.sock_cookie as usize)) else {
        return 0;
    };
    if SOCK_STATES.get_ptr(cookie).is_none() {
        return 0;
    }
    let Some(tgid) = read::<u32>(task.wrapping_add(o.task_tgid as usize)) else {
        return 0;
    };
    if OWNERS.get_ptr(tgid).is_none() && OWNERS.insert(tgid, 1, BPF_ANY.into()).is_err() {
        count(stat::OWNERS_TABLE_FULL);
    }
    0
}

/// Reads a `T` from kernel memory at `p`; `None` for a null or unreadable address.
#[inline(always)]
fn read<T>(p: *const u8) -> Option<T> {
    if p.is_null() {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel(p.cast::<T>()) }.ok()
}
