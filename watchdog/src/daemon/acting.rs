//! The acting thread: a dedicated OS thread, off the tokio runtime, that owns the daemon's
//! state. It sleeps in `ppoll` on the event ring buffer and a command eventfd, with the next due
//! step as its timeout; it wakes for a kernel event, a command (reload, status, stop) or a due
//! time, never otherwise. It runs in SCHED_FIFO at a modest priority when it may
//! (`acting_priority`; CAP_SYS_NICE), so that workers spinning on every CPU do not delay it,
//! and optionally on one CPU (`acting_cpu`).
//!
//! Bounded work per wake-up: at most `MAX_EVENTS_PER_WAKE` events are read from the ring and
//! at most `MAX_STEPS_PER_WAKE` due steps are taken before it polls again (what is left is
//! still due, so the next poll returns at once, after any command). The metrics, records, log
//! lines and event writes of a batch are the reporter thread's (`record.rs`), after the
//! batch's actions. Owners' /proc facts are read once per wake-up, for its events and its steps.

use std::{
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::{atomic::Ordering, mpsc},
    thread::JoinHandle,
};

use aya::maps::{MapData, RingBuf};

use super::*;
use crate::{api::Health, loader::ConnsReader, sched};

/// Events read from the ring per wake-up.
pub(super) const MAX_EVENTS_PER_WAKE: usize = 256;
/// Due steps taken per wake-up.
pub(super) const MAX_STEPS_PER_WAKE: usize = 256;
/// How often the eviction and backstop counters are read.
const POLL_EVERY: Duration = Duration::from_millis(100);
const TICK_EVERY: Duration = Duration::from_secs(1);
/// A wake-up reading at least this many events logs where their time went.
const BURST_LOG: usize = 64;

/// What the tokio side asks of the acting thread.
pub(super) enum Cmd {
    Reload,
    /// A snapshot for the status document (rendered elsewhere).
    Status(tokio::sync::oneshot::Sender<status_doc::StatusJob>),
    /// A `kill_query` thread's outcome: its metrics and record.
    KillDone(Box<step::KillDone>),
    Stop(Stop),
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Stop {
    /// SIGTERM: the kernel side stays pinned.
    Term,
    /// SIGINT: `on_interrupt` decides.
    Interrupt,
}

/// The tokio side's handle: commands, and the eventfd that wakes the thread for them.
pub(super) struct Control {
    tx: mpsc::Sender<Cmd>,
    wake: Arc<OwnedFd>,
}

impl Control {
    pub(super) fn send(&self, cmd: Cmd) {
        if self.tx.send(cmd).is_ok() {
            wake(&self.wake);
        }
    }
}

/// The eventfd that wakes the acting thread for commands and finished table reads.
pub(super) fn new_wake() -> anyhow::Result<Arc<OwnedFd>> {
    // SAFETY: eventfd returns a new descriptor we own, or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("creating the acting thread's eventfd");
    }
    // SAFETY: a freshly created descriptor.
    Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Wakes the acting thread.
pub(super) fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: write of 8 bytes from a live u64 to an eventfd we own.
    unsafe {
        libc::write(
            fd.as_raw_fd(),
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of::<u64>(),
        )
    };
}

/// Starts the acting thread with the daemon's state. `done` fires when it ends, however.
pub(super) fn spawn(
    st: State,
    ring: RingBuf<MapData>,
    wake: Arc<OwnedFd>,
    health: Arc<Health>,
    reader: Arc<ConnsReader>,
    done: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<(Control, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let thread_wake = wake.clone();
    let handle = std::thread::Builder::new()
        .name("watchdog-act".into())
        .spawn(move || {
            let mut acting = Acting {
                st,
                ring,
                rx,
                wake: thread_wake,
                health,
                reader,
                reopened: None,
            };
            acting.schedule();
            acting.health.ready.store(true, Ordering::Relaxed);
            acting.run();
            acting.st.reporter.finish();
            let _ = done.send(());
        })
        .context("starting the acting thread")?;
    Ok((Control { tx, wake }, handle))
}

struct Acting {
    st: State,
    ring: RingBuf<MapData>,
    rx: mpsc::Receiver<Cmd>,
    wake: Arc<OwnedFd>,
    health: Arc<Health>,
    reader: Arc<ConnsReader>,
    /// When the ring was last reopened.
    reopened: Option<std::time::Instant>,
}

impl Acting {
    /// The realtime class and the CPU placement the config asks for, as far as allowed.
    fn schedule(&mut self) {
        let cfg = self.st.cfg.clone();
        if let Some(cpu) = cfg.acting_cpu {
            if let Err(e) = sched::pin_to(cpu) {
                warn!(cpu, error = %e, "could not keep the acting thread on its CPU; it runs on any");
            }
        }
        if cfg.acting_priority > 0 {
            if let Err(e) = sched::set_fifo(cfg.acting_priority) {
                warn!(
                    priority = cfg.acting_priority,
                    error = %sched::refusal(&e),
                    "the acting thread runs in the normal class: SCHED_FIFO was refused; deadlines may be late while workers saturate the CPUs"
                );
            }
        }
        let class = sched::current();
        self.st
            .metrics
            .acting_realtime
            .set(i64::from(matches!(class, sched::Class::Fifo(_))));
        info!(
            class = %class.label(),
            cpu = cfg.acting_cpu.map_or("any".to_string(), |c| c.to_string()),
            "acting thread started"
        );
    }

    fn run(&mut self) {
        let mut next_poll = now_ns();
        let mut next_tick = now_ns();
        let mut ring_ok = true;
        loop {
            let now = now_ns();
            let mut until = next_poll.min(next_tick);
            for t in [self.st.tracker.next_due(), self.st.backstop.next_at()]
                .into_iter()
                .flatten()
            {
                until = until.min(t);
            }
            let (ring_ready, ring_failed, woken) = self.wait(until.saturating_sub(now), ring_ok);
            // Owners' facts as of this wake-up: its events and due steps read each owner once.
            self.st.facts = process::FactsCache::new(policy::uses_lineage(&self.st.cfg));
            if woken {
                self.drain_wake();
                while let Ok(cmd) = self.rx.try_recv() {
                    match cmd {
                        Cmd::Reload => self.st.reload("SIGHUP"),
                        Cmd::KillDone(k) => self.st.kill_done(*k),
                        Cmd::Status(reply) => {
                            let _ = reply.send(self.st.status_job(self.reader.clone()));
                        }
                        Cmd::Stop(Stop::Term) => {
                            info!("SIGTERM: exiting; the kernel side stays pinned for the next start (`watchdog unload` detaches it)");
                            return;
                        }
                        Cmd::Stop(Stop::Interrupt) => {
                            crate::shutdown::on_interrupt(
                                self.st.cfg.on_interrupt,
                                &self.st.cfg.state_dir,
                            );
                            return;
                        }
                    }
                }
            }
            self.st.swept();
            if ring_failed || !ring_ok {
                ring_ok = self.reopen_ring(ring_ok);
            } else if ring_ready {
                self.read_events();
            }
            self.st.run_due();
            let now = now_ns();
            if self.st.backstop.next_at().is_some_and(|t| t <= now) {
                self.st.sweep_if_needed();
                self.st.run_due();
            }
            if now >= next_poll {
                next_poll = now + policy::nanos(POLL_EVERY);
                self.st.evict_if_needed();
                self.st.sweep_if_needed();
                self.st.run_due();
            }
            if now >= next_tick {
                next_tick = now + policy::nanos(TICK_EVERY);
                self.health
                    .last_tick
                    .store(crate::clock::mono_secs(), Ordering::Relaxed);
                self.st.housekeeping();
            }
        }
    }

    /// Sleeps until the ring has events, a command comes, or `timeout_ns` passes. Returns
    /// (events ready, ring failed, commands waiting).
    fn wait(&self, timeout_ns: u64, ring_ok: bool) -> (bool, bool, bool) {
        let mut fds = [
            libc::pollfd {
                fd: if ring_ok {
                    self.ring.as_fd().as_raw_fd()
                } else {
                    -1
                },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ts = libc::timespec {
            tv_sec: (timeout_ns / 1_000_000_000).min(3600) as _,
            tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: ppoll on two pollfds we own for the call, a valid timeout, no signal mask.
        let n = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        if n <= 0 {
            return (false, false, false);
        }
        let bad = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
        (
            fds[0].revents & libc::POLLIN != 0,
            fds[0].revents & bad != 0,
            fds[1].revents & libc::POLLIN != 0,
        )
    }

    fn drain_wake(&self) {
        let mut v: u64 = 0;
        // SAFETY: read of 8 bytes into a live u64 from a non-blocking eventfd we own.
        unsafe {
            libc::read(
                self.wake.as_raw_fd(),
                std::ptr::addr_of_mut!(v).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Up to `MAX_EVENTS_PER_WAKE` events, each turned into a ladder (or dropped).
    fn read_events(&mut self) {
        let mut batch = Vec::new();
        while batch.len() < MAX_EVENTS_PER_WAKE {
            let Some(item) = self.ring.next() else {
                break;
            };
            batch.push(Event::decode(&item));
        }
        let read = now_ns();
        if batch.len() >= BURST_LOG {
            // Where a burst's lateness comes from: the kernel's timers, or the ring and us.
            let (mut timer, mut ring) = (0u64, 0u64);
            for ev in batch.iter().flatten() {
                timer = timer.max(
                    ev.ts_ns
                        .saturating_sub(ev.conn.start_ns.saturating_add(ev.conn.deadline_ns)),
                );
                ring = ring.max(read.saturating_sub(ev.ts_ns));
            }
            info!(
                events = batch.len(),
                timer_late_max_ms = timer as f64 / 1e6,
                in_ring_max_ms = ring as f64 / 1e6,
                "burst of kernel events"
            );
        }
        let mut facts = std::mem::take(&mut self.st.facts);
        for ev in batch {
            match ev {
                Some(ev) => self.st.on_event(ev, &mut facts),
                None => warn!("undecodable kernel event (layout mismatch?)"),
            }
        }
        self.st.facts = facts;
    }

    /// After the ring failed: reopen it from its pin. The backstop sweeps the table for what
    /// was missed; until the ring is back, the sweep enforces (retried each second).
    fn reopen_ring(&mut self, was_ok: bool) -> bool {
        if was_ok {
            error!("the event ring buffer failed: reopening it from its pin; the backstop sweeps the table for what it missed");
        }
        // At most one reopening a second: a ring that fails again at once must not turn this
        // realtime thread into a busy loop.
        let since = self.reopened.map_or(TICK_EVERY, |t| t.elapsed());
        if since < TICK_EVERY {
            std::thread::sleep(TICK_EVERY - since);
        }
        self.reopened = Some(std::time::Instant::now());
        self.st.backstop.owe_sweep();
        match crate::loader::pinned_events(&self.st.cfg.state_dir) {
            Ok(r) => {
                self.ring = r;
                true
            }
            Err(e) => {
                error!("reopening the event ring buffer failed, retrying in 1 s (the backstop enforces meanwhile): {e:#}");
                self.st.sweep_if_needed();
                self.st.run_due();
                false
            }
        }
    }
}
