//! Task life: whatever an exiting thread owned stops being actionable at once; for the syscall
//! probe set, a forked child inherits its parent's file table and so its tracked connections.

use aya_ebpf::{
    bindings::BPF_ANY, helpers::bpf_get_current_pid_tgid, helpers::bpf_probe_read_kernel,
    macros::btf_tracepoint, programs::BtfTracePointContext,
};
use watchdog_common::stat;

use core::ptr;

use crate::maps::{cmpxchg, count, fetch_add, offsets, syscall_set, CONNS, OWNERS, TASKS};

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
/// process. Its life goes with it to the id it has now: `TASKS[old_pid]` moves to
/// `TASKS[tid]` (the old leader's own entry went at its exit, before the exec'ing thread took
/// its id), so a later owner of `old_pid` starts a life of its own and can never match a
/// request of this one. The request the thread started most recently (`cur_cookie`, `cur_gen`)
/// is re-keyed to the new tid inside the connection's seqlock, so it is still enforced, on the
/// process the thread became, as the policy says for that process. Limits: other requests the
/// thread had in flight at once (an event loop's) and its HTTP/2 streams are left to the old
/// tid, which no live task holds: never acted on; a timer callback that reads the record in the
/// instant of the re-key discards its copy (its sequence moved).
///
/// A leader that execs keeps its tid and its entry: its requests stay its own, now served by
/// the exec'd program (a socket without `O_CLOEXEC` survives `execve`).
#[btf_tracepoint(function = "sched_process_exec")]
pub fn task_exec(ctx: BtfTracePointContext) -> u32 {
    let old = ctx.arg::<i32>(1) as u32;
    let tid = bpf_get_current_pid_tgid() as u32;
    if old == tid {
        return 0;
    }
    let Some(t) = TASKS.get_ptr(old) else {
        return 0;
    };
    // SAFETY: map value pointer from a successful lookup.
    let moved = unsafe { *t };
    if let Some(e) = CONNS.get_ptr_mut(moved.cur_cookie) {
        // SAFETY: `e` points into CONNS; the record is written only inside its seqlock.
        unsafe {
            let seq = ptr::addr_of_mut!((*e).seq);
            let s = ptr::read_volatile(seq);
            if s & 1 == 0 && cmpxchg(seq, s, s + 1) == s {
                if (*e).info.tid == old && (*e).info.gen == moved.cur_gen {
                    (*e).info.tid = tid;
                }
                fetch_add(seq, 1);
            }
        }
    }
    let _ = TASKS.insert(tid, moved, BPF_ANY.into());
    let _ = TASKS.remove(old);
    count(stat::TASKS_EXECED);
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
