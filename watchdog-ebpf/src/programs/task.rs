//! Task life: whatever an exiting thread owned stops being actionable at once; for the syscall
//! probe set, a forked child inherits its parent's file table and so its tracked connections.

use aya_ebpf::{
    bindings::BPF_ANY, helpers::bpf_get_current_pid_tgid, helpers::bpf_probe_read_kernel,
    macros::btf_tracepoint, programs::BtfTracePointContext,
};
use watchdog_common::stat;

use crate::maps::{count, offsets, syscall_set, OWNERS, TASKS};

/// `sched_process_exit`, in the context of the exiting thread. Deleting its `TASKS` entry
/// invalidates every request it owned: their `owner_life` no longer matches any live task, so the
/// deadline timer stays silent and userspace's final check refuses to act, even if the tid is
/// reused.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn task_exit(_ctx: BtfTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    if TASKS.remove(tid).is_ok() {
        count(stat::TASKS_EXITED);
    }
    if syscall_set() && tid == (pid_tgid >> 32) as u32 {
        let _ = OWNERS.remove(tid);
    }
    0
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`, in
/// the exec'ing task once the new program is loaded.
///
/// A non-leader thread that calls `execve` takes over its process's id (`de_thread`): its own
/// tid (`old_pid`) vanishes without `sched_process_exit`, and may later be handed to another
/// process. Deleting `TASKS[old_pid]` makes every request it owned unmatched for good, exactly
/// as an exit does: the timer stays silent and userspace's still-current check fails, and a new
/// owner of that tid gets a fresh life stamp. (The old leader's own entry went at its exit,
/// before the exec'ing thread took its id.)
///
/// A leader that execs keeps its tid and its entry: its requests stay its own, now served by
/// the exec'd program (a socket without `O_CLOEXEC` survives `execve`), and are enforced as the
/// policy says for that process.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn task_exec(ctx: BtfTracePointContext) -> u32 {
    let old: i32 = ctx.arg(1);
    let tid = bpf_get_current_pid_tgid() as u32;
    if old as u32 != tid && TASKS.remove(old as u32).is_ok() {
        count(stat::TASKS_EXECED);
    }
    0
}

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`, in the parent.
/// Syscall set only: a server that accepts and then forks a child per connection hands the
/// child its tracked sockets, so the child joins `OWNERS`.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn task_fork(ctx: BtfTracePointContext) -> u32 {
    if !syscall_set() {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if OWNERS.get_ptr(parent).is_none() {
        return 0;
    }
    let child: *const u8 = ctx.arg(1);
    let tgid_at = child.wrapping_add(offsets().task_tgid as usize) as *const u32;
    // SAFETY: bpf_probe_read_kernel checks the address.
    if let Ok(tgid) = unsafe { bpf_probe_read_kernel(tgid_at) } {
        if tgid != parent && OWNERS.insert(tgid, 1, BPF_ANY.into()).is_err() {
            count(stat::OWNERS_TABLE_FULL);
        }
    }
    0
}
