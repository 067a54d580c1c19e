//! The syscall probe set, for kernels without the sock tracepoints (before 6.3).
//!
//! One BTF tracepoint on `raw_syscalls:sys_exit` sees every syscall return on the host. It keeps
//! only accept/accept4 (a process takes a tracked connection), the recv family and read (bytes
//! in), and the send family, write and sendfile (bytes out), then finds the socket behind the fd
//! by walking the task's file table with offsets the daemon read from BTF. Everything after that
//! is shared with the sock set (`start_request` / `end_request`), so the daemon cannot tell the
//! two apart.
//!
//! Why `sys_exit` and not the per-syscall `syscalls:sys_exit_*` tracepoints: those are classic
//! tracepoints, and the kernel refuses maps holding a `bpf_timer` in classic tracepoint programs
//! ("tracing progs cannot use bpf_timer yet"); BTF tracepoints may use them. The fd is still in
//! the saved registers at exit (x86-64 `pt_regs.di`, arm64 `pt_regs.orig_x0`: see `abi`), so no
//! enter program is needed.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use watchdog_common::stat;

use crate::{
    maps::{count, offsets, syscall_set, OWNERS, SOCK_STATES},
    programs::{
        abi::{args, nr, reg, sysno},
        request::{bytes_in, bytes_out, MSG_PEEK},
    },
};

/// `sys_exit(struct pt_regs *regs, long ret)`, in the task that made the syscall.
#[btf_tracepoint(function = "sys_exit")]
pub fn syscall_exit(ctx: BtfTracePointContext) -> u32 {
    if !syscall_set() {
        return 0;
    }
    let ret: i64 = ctx.arg(1);
    if ret < 0 {
        return 0;
    }
    let regs: *const u64 = ctx.arg(0);
    let (sysno, fd) = (sysno(regs), reg(regs, args::A0));
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    match sysno {
        nr::ACCEPT | nr::ACCEPT4 => on_accept(tgid, ret as u64),
        nr::READ | nr::READV | nr::RECVFROM | nr::RECVMSG | nr::RECVMMSG if ret > 0 => {
            let flags = match sysno {
                nr::RECVMSG => reg(regs, args::A2),
                nr::RECVFROM | nr::RECVMMSG => reg(regs, args::A3),
                _ => 0,
            };
            if flags & MSG_PEEK as u64 == 0 {
                if let Some(bytes) = byte_count(sysno, regs, ret as u64) {
                    on_bytes_in(tgid, fd, regs, bytes);
                }
            }
        }
        nr::WRITE | nr::WRITEV | nr::SENDTO | nr::SENDMSG | nr::SENDMMSG | nr::SENDFILE
            if ret > 0 =>
        {
            if let Some(bytes) = byte_count(sysno, regs, ret as u64) {
                on_bytes_out(tgid, fd, regs, bytes);
            }
        }
        _ => {}
    }
    0
}

/// The bytes a syscall moved, from its return value `ret`. recvmmsg and sendmmsg return a count
/// of messages, not bytes: their bytes are the first message's (`msg_len` of the first `struct
/// mmsghdr`, the message whose buffer the head capture reads), never the count.
#[inline(always)]
fn byte_count(sysno: u64, regs: *const u64, ret: u64) -> Option<u64> {
    if sysno != nr::RECVMMSG && sysno != nr::SENDMMSG {
        return Some(ret);
    }
    // `struct mmsghdr { struct user_msghdr msg_hdr; unsigned int msg_len; }`: 56 bytes, then
    // msg_len. The vector is the second argument.
    let first = reg(regs, args::A1);
    // SAFETY: bpf_probe_read_user checks the address; a bad one is an error.
    let len: u32 = unsafe { bpf_probe_read_user((first + MMSGHDR_LEN) as *const u32) }.ok()?;
    (len > 0).then_some(u64::from(len))
}

/// Offset of `msg_len` in `struct mmsghdr` (LP64: x86-64 and arm64 alike).
const MMSGHDR_LEN: u64 = 56;

/// A process took a connection: if it is tracked, the process's reads and writes matter now.
#[inline(always)]
fn on_accept(tgid: u32, fd: u64) {
    if let Some(cookie) = cookie_of_fd(fd) {
        if SOCK_STATES.get_ptr(cookie).is_some()
            && OWNERS.get_ptr(tgid).is_none()
            && OWNERS.insert(tgid, 1, BPF_ANY.into()).is_err()
        {
            count(stat::OWNERS_TABLE_FULL);
        }
    }
}

#[inline(always)]
fn on_bytes_in(tgid: u32, fd: u64, regs: *const u64, ret: u64) {
    if OWNERS.get_ptr(tgid).is_none() {
        return;
    }
    let Some(cookie) = cookie_of_fd(fd) else {
        return;
    };
    if let Some(st) = SOCK_STATES.get_ptr_mut(cookie) {
        // SAFETY: map value pointer from a successful lookup.
        bytes_in(unsafe { &mut *st }, || regs, ret);
    }
}

#[inline(always)]
fn on_bytes_out(tgid: u32, fd: u64, regs: *const u64, ret: u64) {
    if OWNERS.get_ptr(tgid).is_none() {
        return;
    }
    let Some(cookie) = cookie_of_fd(fd) else {
        return;
    };
    if let Some(st) = SOCK_STATES.get_ptr_mut(cookie) {
        // SAFETY: map value pointer from a successful lookup.
        bytes_out(unsafe { &mut *st }, || regs, ret);
    }
}

/// The socket cookie behind `fd` in the current task's file table, if `fd` is a socket.
///
/// `task->files->fdt->fd[fd]->private_data` is a `struct socket` only for socket files; the
/// back pointer `socket->sk->sk_socket == socket` rejects every other kind of file.
#[inline(always)]
fn cookie_of_fd(fd: u64) -> Option<u64> {
    let off = offsets();
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let files: *const u8 = read(task, off.task_files)?;
    let fdt: *const u8 = read(files, off.files_fdt)?;
    let max_fds: u32 = read(fdt, off.fdt_max_fds)?;
    if fd >= u64::from(max_fds) {
        return None;
    }
    let fds: *const u8 = read(fdt, off.fdt_fd)?;
    let file: *const u8 = read(fds, (fd * 8) as u32)?;
    let socket: *const u8 = read(file, off.file_private_data)?;
    let sk: *const u8 = read(socket, off.socket_sk)?;
    let back: *const u8 = read(sk, off.sock_socket)?;
    if back != socket || socket.is_null() {
        return None;
    }
    read(sk, off.sock_cookie)
}

/// Reads a `T` at `base + offset` in kernel memory; `None` for a null base or a failed read.
#[inline(always)]
fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T) }.ok()
}
