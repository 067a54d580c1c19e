//! The syscall ABI of the daemon's architecture: where the saved user registers keep a syscall's
//! number and arguments, and the numbers the programs look at. The eBPF target is `bpfel` on
//! every host, so the architecture comes from the daemon's build: aya-build passes
//! `--cfg bpf_target_arch="<CARGO_CFG_TARGET_ARCH>"` to the nested build (watchdog/build.rs), and
//! one small module per architecture keeps the facts; everything else is shared.
//!
//! Only the register block and the syscall table differ: `struct user_msghdr`, `struct mmsghdr`
//! and `struct iovec` have the same LP64 layout on both.

#[cfg(bpf_target_arch = "aarch64")]
#[path = "aarch64.rs"]
mod arch;
#[cfg(not(bpf_target_arch = "aarch64"))]
#[path = "x86_64.rs"]
mod arch;

#[cfg(all(
    bpf_target_arch,
    not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64"))
))]
compile_error!("watchdog's kernel programs know the syscall ABI of x86_64 and aarch64 only");

pub use arch::{args, nr, sysno};

/// Word `i` of a saved-registers block (`pt_regs`, a BTF pointer the verifier bounds).
#[inline(always)]
pub fn reg(regs: *const u64, i: usize) -> u64 {
    // SAFETY: `regs` is the kernel's `struct pt_regs` of the current task (a tracepoint argument
    // or `bpf_task_pt_regs`); `i` is a constant index within it.
    unsafe { core::ptr::read_volatile(regs.add(i)) }
}
