//! Scheduling of the acting thread: the realtime class (SCHED_FIFO at a modest priority, which
//! needs CAP_SYS_NICE or an RLIMIT_RTPRIO that allows it) and optional CPU placement. Every call
//! here affects only the calling thread.
//!
//! The raw syscalls, not libc's wrappers: musl (the static aarch64 build) stubs
//! `sched_setscheduler`, `sched_getscheduler` and `sched_getparam` to fail with ENOSYS, since
//! the kernel's calls are per thread and POSIX's per process; per thread is what is wanted here.

use std::io;

/// How the calling thread ended up being scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// SCHED_FIFO at this priority.
    Fifo(u8),
    /// SCHED_OTHER (the normal class) at the process's niceness.
    Normal,
}

impl Class {
    pub fn label(self) -> String {
        match self {
            Class::Fifo(p) => format!("SCHED_FIFO {p}"),
            Class::Normal => "SCHED_OTHER".into(),
        }
    }
}

/// Moves the calling thread to SCHED_FIFO at `priority` (1..=99). `SCHED_RESET_ON_FORK` keeps
/// any thread or process it might start out of the realtime class.
pub fn set_fifo(priority: u8) -> io::Result<()> {
    // SAFETY: sched_param is plain integers (musl adds SCHED_SPORADIC fields): zero is valid.
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    param.sched_priority = i32::from(priority);
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid sched_param.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setscheduler,
            0,
            libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK,
            &param as *const libc::sched_param,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's class, as the kernel reports it.
pub fn current() -> Class {
    // SAFETY: sched_getscheduler / sched_getparam on the calling thread; the param struct is
    // written by the kernel.
    unsafe {
        let policy =
            libc::syscall(libc::SYS_sched_getscheduler, 0) as i32 & !libc::SCHED_RESET_ON_FORK;
        if policy == libc::SCHED_FIFO {
            let mut p: libc::sched_param = std::mem::zeroed();
            if libc::syscall(
                libc::SYS_sched_getparam,
                0,
                &mut p as *mut libc::sched_param,
            ) == 0
            {
                return Class::Fifo(p.sched_priority.clamp(0, 99) as u8);
            }
        }
    }
    Class::Normal
}

/// Keeps the calling thread on one CPU.
pub fn pin_to(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it (cpu is in range);
    // sched_setaffinity on the calling thread reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Why SCHED_FIFO was refused, in words: no CAP_SYS_NICE, or (with it) a cgroup without a
/// realtime budget (`CONFIG_RT_GROUP_SCHED`: containers' cgroups get `cpu.rt_runtime_us` 0).
pub fn refusal(e: &io::Error) -> String {
    if e.raw_os_error() != Some(libc::EPERM) {
        return e.to_string();
    }
    if !has_sys_nice() {
        return "no CAP_SYS_NICE".into();
    }
    match rt_runtime_us() {
        Some((path, 0)) => format!(
            "CAP_SYS_NICE is held, but the cgroup has no realtime budget ({path} is 0: realtime group scheduling)"
        ),
        _ => format!("CAP_SYS_NICE is held, yet {e}"),
    }
}

/// CAP_SYS_NICE (bit 23) in this process's effective set.
fn has_sys_nice() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 23) != 0)
}

/// The realtime budget of this process's cgroup v1 `cpu` controller, if it has one.
fn rt_runtime_us() -> Option<(String, i64)> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers
            .split(',')
            .any(|c| c == "cpu")
            .then(|| path.to_string())
    })?;
    let file = format!("/sys/fs/cgroup/cpu{path}/cpu.rt_runtime_us");
    let v = std::fs::read_to_string(&file).ok()?.trim().parse().ok()?;
    Some((file, v))
}

/// Whether this process may put a thread in the realtime class at `priority`: tried on a
/// short-lived thread of its own (for `watchdog check`), so the caller's class is untouched.
pub fn fifo_allowed(priority: u8) -> io::Result<()> {
    std::thread::spawn(move || set_fifo(priority))
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("probe thread panicked")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_is_refused_stays_normal_and_one_that_is_allowed_reports_fifo() {
        // Root in the test suite: allowed. Either way the report must match what was done.
        let r = std::thread::spawn(|| (set_fifo(3), current()))
            .join()
            .unwrap();
        match r {
            (Ok(()), c) => assert_eq!(c, Class::Fifo(3)),
            (Err(e), c) => {
                assert_eq!(e.raw_os_error(), Some(libc::EPERM));
                assert_eq!(c, Class::Normal);
            }
        }
        assert_eq!(
            current(),
            Class::Normal,
            "the test thread itself is untouched"
        );
    }
}
