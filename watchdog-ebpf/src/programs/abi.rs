//! x86-64 syscall ABI: where the saved user registers keep a syscall's number and arguments,
//! and the syscall numbers the programs look at.

/// `struct pt_regs`, in u64 words.
pub mod regs {
    pub const R10: usize = 7;
    pub const DX: usize = 12;
    pub const SI: usize = 13;
    pub const DI: usize = 14;
    pub const ORIG_AX: usize = 15;
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

/// Word `i` of a saved-registers block (`pt_regs`, a BTF pointer the verifier bounds).
#[inline(always)]
pub fn reg(regs: *const u64, i: usize) -> u64 {
    // SAFETY: `regs` is the kernel's `struct pt_regs` of the current task (a tracepoint argument
    // or `bpf_task_pt_regs`); `i` is a constant index within it.
    unsafe { core::ptr::read_volatile(regs.add(i)) }
}
