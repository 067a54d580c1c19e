//! Enforcement: signals through pidfds and TCP connection aborts through SOCK_DESTROY (`kill_query`
//! is `mysql.rs`).
//!
//! Every action takes a `still_valid` check that re-reads the kernel's state *after* the target
//! handle is open and *before* the action. A signal's target is pinned first (`pin`): a pidfd
//! names one task or nothing, and that task is checked, through the pinned task itself, to be
//! the request's owner (a thread of the request's process, started no later than the request):
//! a tid that vanished without an exit (a thread that exec'd) or was handed out again names
//! another task, which is refused, never signalled. Then `still_valid` proves the request is
//! still in flight on the same connection. This closes the PID-reuse race.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Arc,
};

use nix::sys::signal::Signal;

use watchdog_common::ConnInfo;

use crate::{config::Target, policy::Refusal, process::ProcessFacts};

/// The result of one action, as logged and counted (`result` label).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The signal was queued to the target / the connection was aborted.
    Delivered,
    /// Observe mode (or an open circuit breaker): nothing was done.
    Observed,
    /// The request had ended (or changed owner) by the time we looked: nothing was done.
    Ended,
    /// The target no longer exists.
    TargetGone,
    /// A safety rule or policy guard said no.
    Refused(&'static str),
    /// The connection was shut down through the owner's own descriptor of it (`pidfd_getfd`):
    /// the socket is outside the daemon's network namespace (a pod) or the kernel has no
    /// SOCK_DESTROY. The peer gets a FIN, not a RST.
    ShutDown,
    /// The owner is alive but holds no descriptor of the connection any more.
    NoSuchSocket,
    /// The system call failed.
    Failed(String),
    /// `kill_query`: the statement was cancelled (`KILL QUERY <id>`, in the detail).
    Killed(String),
    /// `kill_query`: no connection of the server is the request's, or it runs no statement.
    NoSuchQuery(String),
    /// `kill_query`: more than one connection matched the peer; nothing was killed.
    Ambiguous(String),
    /// `kill_query`: the server could not be reached (connect, timeout, broken connection).
    Unreachable(String),
    /// `kill_query`: the server refused the account (wrong password, missing privilege).
    AccessDenied(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Observed => "observed",
            Outcome::Ended => "ended",
            Outcome::TargetGone => "target_gone",
            Outcome::Refused(_) => "refused",
            Outcome::ShutDown => "delivered",
            Outcome::NoSuchSocket => "no_such_socket",
            Outcome::Failed(_) => "failed",
            Outcome::Killed(_) => "delivered",
            Outcome::NoSuchQuery(_) => "no_such_query",
            Outcome::Ambiguous(_) => "ambiguous",
            Outcome::Unreachable(_) => "unreachable",
            Outcome::AccessDenied(_) => "access_denied",
        }
    }

    /// What the record's `detail` says, if anything.
    pub fn detail(&self) -> Option<String> {
        match self {
            Outcome::Refused(r) => Some((*r).to_string()),
            Outcome::Failed(t)
            | Outcome::Killed(t)
            | Outcome::NoSuchQuery(t)
            | Outcome::Ambiguous(t)
            | Outcome::Unreachable(t)
            | Outcome::AccessDenied(t) => Some(t.clone()),
            Outcome::ShutDown => Some(
                "shut down through the owner's descriptor (socket outside this network namespace, or no SOCK_DESTROY)"
                    .into(),
            ),
            _ => None,
        }
    }
}

const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;

/// `pidfd_open`, falling back on the reserve descriptor when the table is full (`fds.rs`).
pub(crate) fn pidfd_open(pid: u32, flags: libc::c_uint) -> io::Result<OwnedFd> {
    crate::fds::with_reserve(|| {
        // SAFETY: plain syscall; on success the return value is a new file descriptor we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly opened descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    })
}

fn pidfd_send_signal(fd: &OwnedFd, sig: Signal) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own; no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<u8>(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn tgkill(tgid: u32, tid: u32, sig: Signal) -> io::Result<()> {
    // SAFETY: plain syscall.
    let r = unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            tgid as libc::pid_t,
            tid as libc::pid_t,
            sig as libc::c_int,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn gone_or_failed(e: io::Error) -> Outcome {
    if e.raw_os_error() == Some(libc::ESRCH) {
        Outcome::TargetGone
    } else {
        Outcome::Failed(e.to_string())
    }
}

/// The pidfds opened during one batch of actions, so that a burst of requests owned by one
/// thread or process opens one, not one per request. A pidfd names the task it was opened for
/// or nothing at all, so one opened earlier in the batch pins the target exactly as a fresh one
/// does, and `still_valid` is still read after it was opened. Beside each: what was read about
/// the pinned task after it was pinned (its start, its facts), so a burst reads them once.
/// Cleared after each batch.
#[derive(Default)]
pub struct Pidfds(HashMap<(u32, libc::c_uint), Entry>);

/// A target pinned during a batch, and what was read about it once it was.
struct Entry {
    /// `None`: no thread pidfds in this kernel (before 6.9); the signal goes through `tgkill`.
    fd: Option<OwnedFd>,
    /// The thread group it was checked against, and the task's start in clock ticks since
    /// boot, read through `/proc/<tgid>/task/<tid>/stat` after the pidfd was opened (`None`:
    /// the task is not a thread of that group, or is gone).
    start: Option<(u32, Option<u64>)>,
    /// The process's facts, read after the pidfd was opened (`None` inside: gone).
    facts: Option<Option<Arc<ProcessFacts>>>,
}

/// Descriptors a batch keeps open at most; beyond it each action opens and closes its own.
const PIDFDS_KEPT: usize = 256;

impl Pidfds {
    /// Closes them all (at the end of a batch).
    pub fn clear(&mut self) {
        self.0.clear();
    }

    fn entry<'a>(&'a mut self, pin: &'a mut Pin) -> &'a mut Entry {
        match pin.own {
            Some(ref mut e) => e,
            None => self.0.get_mut(&pin.key).expect("kept until the batch ends"),
        }
    }
}

fn key(target: Target, tgid: u32, tid: u32) -> (u32, libc::c_uint) {
    match target {
        Target::Process => (tgid, 0),
        Target::Thread => (tid, PIDFD_THREAD),
    }
}

/// A signal target pinned by a pidfd (opened now or earlier in the batch) and checked, through
/// the pinned task, to be the request's owner: a thread of the request's process (or that
/// process) that started no later than the request did (`pin`).
pub struct Pin {
    key: (u32, libc::c_uint),
    tgid: u32,
    tid: u32,
    /// The entry, when the batch keeps no more (`PIDFDS_KEPT`).
    own: Option<Entry>,
}

/// Pins the step's target and checks that the pinned task is the request's owner, never a task
/// that took its id since: the id alone says nothing once a thread has exec'd (its tid vanishes
/// without an exit, and the stale `TASKS` entry still matches) or the ids wrapped.
///
/// After the pidfd is open (so it names that task or nothing), `/proc/<tgid>/task/<tid>/stat`
/// must exist (the kernel finds `tid` only among the threads of `tgid`: a task of another
/// process is not there) and its start time must not be later than the request's start
/// (`started_by`). Any task that holds the id after the pidfd was opened started after it, so
/// a stale read cannot pass for the pinned one. `Err`: the step's outcome (target gone, or
/// refused as not the owner); nothing is sent.
pub fn pin(fds: &mut Pidfds, target: Target, c: &ConnInfo) -> Result<Pin, Outcome> {
    let key = key(target, c.tgid, c.tid);
    let tid = match target {
        Target::Process => c.tgid,
        Target::Thread => c.tid,
    };
    let mut pin = Pin {
        key,
        tgid: c.tgid,
        tid,
        own: None,
    };
    if !fds.0.contains_key(&key) {
        let fd = match pidfd_open(key.0, key.1) {
            Ok(fd) => Some(fd),
            // Before Linux 6.9 there are no thread pidfds: `tgkill` checks that tid still
            // belongs to tgid, and the start check below leaves only a microsecond window.
            Err(e) if key.1 == PIDFD_THREAD && e.raw_os_error() == Some(libc::EINVAL) => None,
            Err(e) => return Err(gone_or_failed(e)),
        };
        let entry = Entry {
            fd,
            start: None,
            facts: None,
        };
        if fds.0.len() >= PIDFDS_KEPT {
            pin.own = Some(entry);
        } else {
            fds.0.insert(key, entry);
        }
    }
    let entry = fds.entry(&mut pin);
    let start = match entry.start {
        Some((tgid, start)) if tgid == c.tgid => start,
        _ => {
            let start = task_start_ticks(c.tgid, tid);
            entry.start = Some((c.tgid, start));
            start
        }
    };
    let owner = start.is_some_and(|ticks| {
        started_by(
            ticks,
            1_000_000_000 / procfs::ticks_per_second().max(1),
            c.start_ns,
            boot_minus_mono_ns(),
        )
    });
    if owner {
        Ok(pin)
    } else {
        Err(Outcome::Refused(Refusal::NotOwner.label()))
    }
}

/// The pinned process's facts (comm, exe, cgroup ...), read by `read` once per batch after the
/// pidfd was opened: the policy, the guard and `[protect]` judge the process that would
/// receive the signal, not what the request's first owner was. `None`: it is gone.
pub fn pinned_facts(
    fds: &mut Pidfds,
    pin: &mut Pin,
    read: impl FnOnce(u32, u32) -> Option<ProcessFacts>,
) -> Option<Arc<ProcessFacts>> {
    let (tgid, tid) = (pin.tgid, pin.tid);
    fds.entry(pin)
        .facts
        .get_or_insert_with(|| read(tgid, tid).map(Arc::new))
        .clone()
}

/// Sends `sig` through the pinned target's pidfd if `still_valid()` holds (it runs after the
/// pin; a caller that has just taken that reading, with nothing slow since, passes `|| true`).
pub fn send(
    fds: &mut Pidfds,
    mut pin: Pin,
    sig: Signal,
    still_valid: impl FnOnce() -> bool,
) -> Outcome {
    if !still_valid() {
        return Outcome::Ended;
    }
    let (tgid, tid) = (pin.tgid, pin.tid);
    match &fds.entry(&mut pin).fd {
        Some(fd) => pidfd_send_signal(fd, sig),
        None => tgkill(tgid, tid, sig),
    }
    .map_or_else(gone_or_failed, |()| Outcome::Delivered)
}

/// Did a task that started `start_ticks` clock ticks after boot (`/proc/.../stat` field 22,
/// CLOCK_BOOTTIME, truncated to ticks of `tick_ns`) start no later than a request that started
/// at `request_mono_ns` (`bpf_ktime_get_ns`, CLOCK_MONOTONIC)?
///
/// `boot_minus_mono_ns` is CLOCK_BOOTTIME minus CLOCK_MONOTONIC read now: the time the machine
/// spent suspended since boot. It only grows, so the request's boot time computed with today's
/// value is never earlier than its true one: the owner (which started before its request)
/// always passes, and a suspend between the request and now only widens what passes by the
/// suspend's length. One tick of slack covers the truncation and the two clock reads. A task
/// that started more than a tick after the request is never taken for its owner.
pub fn started_by(
    start_ticks: u64,
    tick_ns: u64,
    request_mono_ns: u64,
    boot_minus_mono_ns: u64,
) -> bool {
    start_ticks.saturating_mul(tick_ns)
        <= request_mono_ns
            .saturating_add(boot_minus_mono_ns)
            .saturating_add(tick_ns)
}

/// CLOCK_BOOTTIME - CLOCK_MONOTONIC, now (the time spent suspended since boot).
fn boot_minus_mono_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    let ns = |c| {
        clock_gettime(c).map_or(0, |t| {
            t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
        })
    };
    let mono = ns(ClockId::CLOCK_MONOTONIC);
    ns(ClockId::CLOCK_BOOTTIME).saturating_sub(mono)
}

/// The start of thread `tid` of process `tgid`, in clock ticks since boot; `None` if `tid` is
/// not a thread of `tgid` (the kernel's lookup of `/proc/<tgid>/task/<tid>` finds only the
/// group's own threads) or either is gone.
fn task_start_ticks(tgid: u32, tid: u32) -> Option<u64> {
    use procfs::FromRead as _;
    let stat = procfs::process::Stat::from_file(format!("/proc/{tgid}/task/{tid}/stat")).ok()?;
    (stat.pid == tid as i32).then_some(stat.starttime)
}

/// `pin` then `send`: the whole signal path for a caller with nothing to read in between.
pub fn signal(
    fds: &mut Pidfds,
    target: Target,
    c: &ConnInfo,
    sig: Signal,
    still_valid: impl FnOnce() -> bool,
) -> Outcome {
    match pin(fds, target, c) {
        Ok(pin) => send(fds, pin, sig, still_valid),
        Err(outcome) => outcome,
    }
}

/// Does this kernel have thread pidfds (PIDFD_THREAD, Linux 6.9+)?
pub fn thread_pidfds_supported() -> bool {
    // SAFETY: gettid has no failure mode.
    let tid = unsafe { libc::gettid() } as u32;
    pidfd_open(tid, PIDFD_THREAD).is_ok()
}

mod reset;

pub use reset::{reset, sock_destroy_supported};

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use proptest::prelude::*;

    use super::*;

    fn owned_by(pid: u32, tid: u32, start_ns: u64) -> ConnInfo {
        ConnInfo {
            tgid: pid,
            tid,
            start_ns,
            ..ConnInfo::default()
        }
    }

    #[test]
    fn a_pinned_target_is_signalled_through_its_batch_pidfd_and_never_after_it_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let c = owned_by(pid, pid, crate::clock::now_ns());
        let mut fds = Pidfds::default();
        // The check runs after the pin, and says no: nothing is sent.
        assert_eq!(
            signal(&mut fds, Target::Process, &c, Signal::SIGKILL, || false),
            Outcome::Ended
        );
        assert_eq!(fds.0.len(), 1, "pinned for the batch");
        let pin = pin(&mut fds, Target::Process, &c).expect("the owner");
        assert_eq!(fds.0.len(), 1, "the batch's pidfd, not a new one");
        assert_eq!(
            send(&mut fds, pin, Signal::SIGKILL, || true),
            Outcome::Delivered
        );
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        // Reaped: its pid may be handed out again, but the batch's pidfd names the old process.
        let mut pinned = Pin {
            key: (pid, 0),
            tgid: pid,
            tid: pid,
            own: None,
        };
        assert!(fds.entry(&mut pinned).fd.is_some());
        assert_eq!(
            send(&mut fds, pinned, Signal::SIGKILL, || true),
            Outcome::TargetGone
        );
        fds.clear();
        assert!(fds.0.is_empty());
    }

    #[test]
    fn a_task_that_is_not_the_owner_is_refused_before_anything_is_sent() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let not_owner = Outcome::Refused(Refusal::NotOwner.label());
        // Started after the request: the id is another task's now.
        let long_ago = owned_by(pid, pid, 1_000_000);
        let mut fds = Pidfds::default();
        assert_eq!(
            signal(
                &mut fds,
                Target::Process,
                &long_ago,
                Signal::SIGKILL,
                || true
            ),
            not_owner
        );
        // A thread that is not of the request's process (here: a process of its own).
        let me = std::process::id();
        let elsewhere = owned_by(me, pid, crate::clock::now_ns());
        assert_eq!(
            signal(
                &mut fds,
                Target::Thread,
                &elsewhere,
                Signal::SIGKILL,
                || true
            ),
            not_owner
        );
        assert!(child.try_wait().unwrap().is_none(), "never signalled");
        // The owner itself, on a request that started after it did.
        let c = owned_by(pid, pid, crate::clock::now_ns());
        assert_eq!(
            signal(&mut fds, Target::Thread, &c, Signal::SIGKILL, || true),
            Outcome::Delivered
        );
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }

    proptest! {
        /// Both directions: a task that started no later than the request always passes,
        /// whatever the machine spent suspended after the request (the offset read now only
        /// grew); a task that started more than a tick after the request never does.
        #[test]
        fn started_by_takes_the_owner_and_nothing_that_started_later(
            tick_ns in prop_oneof![Just(10_000_000u64), Just(1_000_000u64), 1u64..20_000_000],
            request_mono in 0u64..1u64 << 50,
            suspended_before in 0u64..1u64 << 40,
            suspended_since in 0u64..1u64 << 40,
            before in 0u64..1u64 << 40,
            after in 0u64..1u64 << 40,
        ) {
            let request_boot = request_mono + suspended_before;
            let offset_now = suspended_before + suspended_since;
            // The owner started at or before the request (boot clock), truncated to ticks.
            let owner = request_boot.saturating_sub(before) / tick_ns;
            prop_assert!(started_by(owner, tick_ns, request_mono, offset_now));
            // A task that started after the request, beyond the slack, with no suspend since.
            let later = (request_boot + 2 * tick_ns + after) / tick_ns;
            prop_assert!(!started_by(later, tick_ns, request_mono, suspended_before));
        }
    }
}
