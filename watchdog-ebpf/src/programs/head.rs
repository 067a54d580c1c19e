//! A request's first bytes, read from the user buffer of the syscall that received them.
//!
//! The sock tracepoints and `sys_exit` both fire after the copy to or from user memory, in the
//! task that made the syscall: its saved registers name the buffer. Only the plain buffer forms
//! are followed (read/recvfrom, readv, recvmsg/recvmmsg's first iovec, and the same for sends);
//! io_uring, splice and sendfile have no user buffer here, and a page fault fails the copy. All of
//! those count as unreadable: the request runs on its policy's budget. The rules that interpret
//! the bytes live in `watchdog_common::head`, shared with the daemon's tests.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    btf_maps::lpm_trie::Key,
    helpers::{bpf_get_current_task_btf, bpf_probe_read_user, bpf_task_pt_regs, generated},
};
use watchdog_common::head::{
    head_state, is_interim, is_status_line, route_key, scan_blank, KeyOutcome, RouteValue,
    BLANK_SCAN, HEAD_BYTES, ROUTE_KEY_DATA,
};

use crate::{
    maps::{ConnEntry, BLANK_SCRATCH, ROUTES, SCRATCH},
    programs::abi::{args, nr, reg, sysno},
};

/// The current task's saved user registers (sock set; the syscall set has them as an argument).
#[inline(always)]
pub fn current_regs() -> *const u64 {
    // SAFETY: helpers without memory arguments; the result is the kernel's pt_regs of the
    // current task, a pointer the verifier tracks as such.
    unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u64 }
}

/// `struct iovec`.
#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

/// Offset of `msg_iov` in `struct user_msghdr` (also the start of `struct mmsghdr`).
const MSGHDR_IOV: u64 = 16;

/// The first user buffer of the current recv/send syscall, and its size.
#[inline(always)]
fn user_buffer(regs: *const u64) -> Option<(u64, u64)> {
    let (sysno, si, dx) = (sysno(regs), reg(regs, args::A1), reg(regs, args::A2));
    let iov = match sysno {
        nr::READ | nr::WRITE | nr::RECVFROM | nr::SENDTO => return Some((si, dx)),
        nr::READV | nr::WRITEV => si,
        nr::RECVMSG | nr::SENDMSG | nr::RECVMMSG | nr::SENDMMSG => {
            // SAFETY: bpf_probe_read_user checks the address; a bad one is an error.
            unsafe { bpf_probe_read_user((si + MSGHDR_IOV) as *const u64) }.ok()?
        }
        _ => return None,
    };
    // SAFETY: as above.
    let v: IoVec = unsafe { bpf_probe_read_user(iov as *const IoVec) }.ok()?;
    Some((v.base, v.len))
}

/// Copies the request's first bytes (at most `HEAD_BYTES`, at most the `ret` bytes received)
/// into the connection's record. Returns the `head_state` and the number of bytes copied.
#[inline(always)]
pub fn capture(e: *mut ConnEntry, regs: *const u64, ret: u64) -> (u8, u16) {
    let Some((addr, size)) = user_buffer(regs) else {
        return (head_state::UNREADABLE, 0);
    };
    let mut n = if ret < size { ret } else { size };
    if n > HEAD_BYTES as u64 {
        n = HEAD_BYTES as u64;
    }
    if n == 0 {
        return (head_state::UNREADABLE, 0);
    }
    // SAFETY: the destination is the record's `head` array in CONNS (HEAD_BYTES long, n is at
    // most that); the source is a user address the helper checks.
    let rc = unsafe {
        generated::bpf_probe_read_user(
            ptr::addr_of_mut!((*e).head) as *mut c_void,
            n as u32,
            addr as *const c_void,
        )
    };
    if rc != 0 {
        return (head_state::UNREADABLE, 0);
    }
    (head_state::READ, n as u16)
}

/// What the route table says about the request whose head is in `e`.
pub enum Route {
    /// A route matched.
    Found(RouteValue),
    /// No route matched (or the bytes are not an HTTP/1.x request line): the port's default.
    Default,
    /// The request line ends before its path: the port's default, counted.
    Split,
}

/// Looks the request up in `ROUTES` by (port index, method, path).
#[inline(always)]
pub fn route(port: u16, e: *const ConnEntry, len: u16) -> Route {
    let Some(key) = SCRATCH.get_ptr_mut(0) else {
        return Route::Default;
    };
    // SAFETY: `key` is this CPU's scratch slot (preemption is off in these programs); `e`
    // points into CONNS. `data` is a byte array: its place in the packed key is aligned enough.
    let (key, head) = unsafe { (&mut *key, &(*e).head) };
    match route_key(port, head, usize::from(len), &mut key.data) {
        KeyOutcome::Key(bits) => {
            key.prefix_len = bits;
            match ROUTES.get(key) {
                Some(v) => Route::Found(*v),
                None => Route::Default,
            }
        }
        KeyOutcome::NotHttp => Route::Default,
        KeyOutcome::Split => Route::Split,
    }
}

/// Scratch key for the route lookup (`SCRATCH`): too large for the program stack.
pub type RouteKey = Key<[u8; ROUTE_KEY_DATA]>;

/// What the first bytes of an answer on an HTTP/1.x connection are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `HTTP/1.x 101` (Switching Protocols).
    Switching,
    /// `HTTP/1.x 1xx` other than `101`: an interim answer, the request goes on.
    Interim,
    /// Anything else (a final status line, or bytes that could not be read).
    Final,
}

/// Reads the first 12 bytes of the answer being sent.
#[inline(always)]
pub fn answer(regs: *const u64, ret: u64) -> Answer {
    const LEN: u64 = 12;
    let Some((addr, size)) = user_buffer(regs) else {
        return Answer::Final;
    };
    if ret < LEN || size < LEN {
        return Answer::Final;
    }
    // SAFETY: bpf_probe_read_user checks the address.
    let Ok(b) = (unsafe { bpf_probe_read_user(addr as *const [u8; LEN as usize]) }) else {
        return Answer::Final;
    };
    if b[9] == b'1' && b[10] == b'0' && b[11] == b'1' && is_status_line(&b) {
        Answer::Switching
    } else if is_interim(&b) {
        Answer::Interim
    } else {
        Answer::Final
    }
}

/// What one read says about the end of an HTTP/1.x head.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Blank {
    /// The blank line is among the bytes read.
    Found,
    /// Not yet: the last three bytes, for the next read.
    NotYet(u32),
    /// The bytes could not be scanned (no plain buffer, more than one buffer, a fault, or more
    /// than `BLANK_SCAN` bytes without the blank line): taken as a whole head.
    Unknown,
}

/// Scans the bytes of the current read (`ret` of them) for the end of a head, `tail` being
/// the last three bytes of the reads before it.
#[inline(always)]
pub fn scan_read(regs: *const u64, ret: u64, tail: u32) -> Blank {
    let Some((addr, size)) = user_buffer(regs) else {
        return Blank::Unknown;
    };
    if ret > size || ret == 0 {
        return Blank::Unknown;
    }
    let Some(buf) = BLANK_SCRATCH.get_ptr_mut(0) else {
        return Blank::Unknown;
    };
    let n = if ret > BLANK_SCAN as u64 {
        BLANK_SCAN as u64
    } else {
        ret
    };
    // SAFETY: the destination is this CPU's scratch buffer (BLANK_SCAN bytes, n is at most
    // that, and at least 1); the source is a user address the helper checks.
    let rc = unsafe {
        generated::bpf_probe_read_user(buf as *mut c_void, n as u32, addr as *const c_void)
    };
    if rc != 0 {
        return Blank::Unknown;
    }
    // SAFETY: as above; preemption is off in these programs.
    match scan_blank(unsafe { &*buf }, n as usize, tail) {
        (true, _) => Blank::Found,
        (false, _) if ret > BLANK_SCAN as u64 => Blank::Unknown,
        (false, t) => Blank::NotYet(t),
    }
}
