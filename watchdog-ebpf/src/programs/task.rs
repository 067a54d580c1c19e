//! Task exit: whatever the exiting thread owned stops being actionable at once.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use watchdog_common::stat;

use crate::maps::{count, TASKS};

/// `sched_process_exit`, in the context of the exiting thread. Deleting its `TASKS` entry
/// invalidates every request it owned: their `owner_life` no longer matches any live task, so the
/// deadline timer stays silent and userspace's final check refuses to act, even if the tid is
/// reused.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn task_exit(_ctx: BtfTracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if TASKS.remove(tid).is_ok() {
        count(stat::TASKS_EXITED);
    }
    0
}
