//! arm64: `struct pt_regs` (arch/arm64/include/asm/ptrace.h) and the generic syscall table
//! (include/uapi/asm-generic/unistd.h), the one arm64 uses.
//!
//! ```c
//! struct pt_regs {
//!     union { struct user_pt_regs user_regs;                       /* words 0..=33 */
//!             struct { u64 regs[31]; u64 sp; u64 pc; u64 pstate; }; };
//!     u64 orig_x0;                                                 /* word 34 */
//!     s32 syscallno; u32 unused2;                                  /* word 35 (LE) */
//!     ...
//! };
//! ```
//! At syscall exit `regs[0]` holds the return value; the first argument survives in `orig_x0`.
//! `x1..x3` are not written by the return. The layout has been this since 4.19 (syscallno became
//! `s32` beside `unused2`), older than any kernel watchdog supports.

/// Word indices in `struct pt_regs` of a syscall's arguments, valid at syscall exit.
pub mod args {
    /// orig_x0 (x0 is the return value by then)
    pub const A0: usize = 34;
    /// x1
    pub const A1: usize = 1;
    /// x2
    pub const A2: usize = 2;
    /// x3
    pub const A3: usize = 3;
}

/// Byte offset of `pt_regs.syscallno` (an `s32`: the verifier refuses a wider load of a BTF
/// member, so it is read as one).
const SYSCALLNO: usize = 35 * 8;

/// The number of the syscall the saved registers belong to (`NO_SYSCALL`, -1, matches none).
#[inline(always)]
pub fn sysno(regs: *const u64) -> u64 {
    // SAFETY: `regs` is the kernel's `struct pt_regs` of the current task (a tracepoint argument
    // or `bpf_task_pt_regs`), which holds the s32 `syscallno` at this constant byte offset.
    let n = unsafe { core::ptr::read_volatile(regs.cast::<u8>().add(SYSCALLNO).cast::<u32>()) };
    u64::from(n)
}

/// Syscall numbers (asm-generic: none of them equal x86-64's; `read` is 63, not 0).
pub mod nr {
    pub const READ: u64 = 63;
    pub const WRITE: u64 = 64;
    pub const READV: u64 = 65;
    pub const WRITEV: u64 = 66;
    pub const SENDFILE: u64 = 71;
    pub const ACCEPT: u64 = 202;
    pub const SENDTO: u64 = 206;
    pub const RECVFROM: u64 = 207;
    pub const SENDMSG: u64 = 211;
    pub const RECVMSG: u64 = 212;
    pub const ACCEPT4: u64 = 242;
    pub const RECVMMSG: u64 = 243;
    pub const SENDMMSG: u64 = 269;
}
