//! The two probe sets, and what the syscall set needs to know about the running kernel.
//!
//! Both sets feed the same maps and produce the same events; the daemon picks one at load time and
//! writes its choice (and, for the syscall set, the struct offsets read from the kernel's BTF) into
//! read-only globals of the eBPF object. The verifier sees those as constants and drops the code
//! of the other set.

/// `sock:sock_recv_length` / `sock:sock_send_length` (Linux 6.3+): one program call per recv
/// and send on a socket, with the socket at hand.
pub const SOCK: u32 = 0;
/// `raw_syscalls:sys_exit` (any kernel with BTF): one program call per syscall; the socket is
/// found from the fd through the task's file table.
pub const SYSCALLS: u32 = 1;

/// Byte offsets of the kernel struct fields the syscall set walks, from `/sys/kernel/btf/vmlinux`.
///
/// aya has no CO-RE relocations for Rust programs, so the daemon resolves these at load time.
/// The walk is `task->files->fdt->fd[fd]->private_data (struct socket) ->sk`, checked by
/// `sk->sk_socket == socket`, then `sk->__sk_common.skc_cookie`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.files`
    pub task_files: u32,
    /// `task_struct.tgid`
    pub task_tgid: u32,
    /// `files_struct.fdt`
    pub files_fdt: u32,
    /// `fdtable.max_fds`
    pub fdt_max_fds: u32,
    /// `fdtable.fd`
    pub fdt_fd: u32,
    /// `file.private_data`
    pub file_private_data: u32,
    /// `socket.sk`
    pub socket_sk: u32,
    /// `sock.sk_socket`
    pub sock_socket: u32,
    /// `sock.__sk_common.skc_cookie`
    pub sock_cookie: u32,
    pub _pad: u32,
    /// `sock_common` fields the socket iterator reads (`programs/adopt.rs`), both sets:
    /// `skc_daddr`, `skc_rcv_saddr`, `skc_dport` (network order), `skc_num` (host order),
    /// `skc_family`, `skc_state`, `skc_v6_daddr`, `skc_v6_rcv_saddr`.
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
}

const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 72);

#[cfg(feature = "user")]
// SAFETY: plain #[repr(C)] u32 fields, no padding (checked above).
unsafe impl aya::Pod for KernelOffsets {}
