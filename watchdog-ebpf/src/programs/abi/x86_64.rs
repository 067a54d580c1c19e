//! x86-64: `struct pt_regs` (arch/x86/include/asm/ptrace.h) and the x86-64 syscall table
//! (arch/x86/entry/syscalls/syscall_64.tbl).

use super::reg;

/// Word indices in `struct pt_regs` of a syscall's arguments, valid at syscall exit too (the
/// return value goes to `ax`, none of these).
pub mod args {
    /// di
    pub const A0: usize = 14;
    /// si
    pub const A1: usize = 13;
    /// dx
    pub const A2: usize = 12;
    /// r10 (the syscall ABI's fourth argument; `cx` is clobbered by `syscall`)
    pub const A3: usize = 7;
}

/// `pt_regs.orig_ax`, word 15.
const ORIG_AX: usize = 15;

/// The number of the syscall the saved registers belong to.
#[inline(always)]
pub fn sysno(regs: *const u64) -> u64 {
    reg(regs, ORIG_AX)
}

/// Syscall numbers.
pub mod nr {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const SENDFILE: u64 = 40;
    pub const ACCEPT: u64 = 43;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
    pub const SENDMSG: u64 = 46;
    pub const RECVMSG: u64 = 47;
    pub const ACCEPT4: u64 = 288;
    pub const RECVMMSG: u64 = 299;
    pub const SENDMMSG: u64 = 307;
}
