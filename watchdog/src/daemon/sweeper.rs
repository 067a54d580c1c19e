//! The backstop's reads of the whole connection table, off the acting thread. Reading `CONNS`
//! takes a syscall pair per entry (aya has no batch lookup): about 100 ms at 50,000 tracked
//! connections, and a burst of deadlines is exactly when the kernel's failure counters move
//! and ask for it. The acting thread asks (`request`), goes on acting, and takes the result
//! when the reader thread wakes it (`take`). The requests it hands on are marked ones, whose
//! deadline is usually still ahead when a read ends: the backstop then waits for it.
//!
//! Eviction's table read is this thread's too (`evict`): the acting thread sees the tracked
//! count pass the high-water mark (two counter reads) and asks; this thread reads the table,
//! chooses, re-reads and deletes each chosen record if still idle, and counts what it dropped.
//! An idle-connection flood, which is what triggers eviction, never holds up an action.

use std::{os::fd::OwnedFd, sync::mpsc, thread::JoinHandle};

use super::*;
use crate::loader::ConnsReader;

/// What the acting thread asks of this thread.
enum Ask {
    /// A read of the in-flight entries, for the backstop.
    Sweep,
    /// An eviction pass (`evict.rs`) under the config of the moment, with the tracked count
    /// that triggered it.
    Evict(Evictor, Arc<Config>, u64),
}

/// Where eviction reports what it dropped.
pub(super) struct EvictReport {
    pub(super) dropped: prometheus_client::metrics::family::Family<
        crate::metrics::ReasonLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    pub(super) max: u32,
}

pub(super) struct Sweeper {
    ask: Option<mpsc::Sender<Ask>>,
    answers: mpsc::Receiver<(u64, Vec<ConnInfo>)>,
    /// A read is under way; `again`: another was asked for meanwhile.
    pending: bool,
    again: bool,
    handle: Option<JoinHandle<()>>,
}

impl Sweeper {
    /// Starts the reader thread; it wakes the acting thread through `wake` when a read is done.
    /// `evictor`: a handle of its own on the table, for deleting.
    pub(super) fn start(
        reader: Arc<ConnsReader>,
        mut evictor: ConnsReader,
        report: EvictReport,
        wake: Arc<OwnedFd>,
    ) -> anyhow::Result<Self> {
        let (ask, asked) = mpsc::channel::<Ask>();
        let (answer, answers) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("watchdog-sweep".into())
            .spawn(move || {
                for ask in asked {
                    if let Ask::Evict(ev, cfg, tracked) = ask {
                        evict(&mut evictor, &ev, &cfg, tracked, &report);
                        continue;
                    }
                    // Taken before the read: a request whose deadline passes during the read
                    // is not yet due by this clock, so the backstop re-reads it alone at once.
                    let at = now_ns();
                    let in_flight: Vec<ConnInfo> = reader
                        .records()
                        .into_iter()
                        .map(|r| r.info)
                        .filter(|c| c.state == watchdog_common::ReqState::InFlight as u32)
                        .collect();
                    if answer.send((at, in_flight)).is_err() {
                        return;
                    }
                    acting::wake(&wake);
                }
            })
            .context("starting the table reader thread")?;
        Ok(Self {
            ask: Some(ask),
            answers,
            pending: false,
            again: false,
            handle: Some(handle),
        })
    }

    /// Asks for a read of the whole table (once more after the current one, if one is under way).
    pub(super) fn request(&mut self) {
        if self.pending {
            self.again = true;
            return;
        }
        if let Some(ask) = &self.ask {
            self.pending = ask.send(Ask::Sweep).is_ok();
        }
    }

    /// Asks for an eviction pass (`evict.rs`) at `tracked` connections.
    pub(super) fn evict(&self, evictor: Evictor, cfg: Arc<Config>, tracked: u64) {
        if let Some(ask) = &self.ask {
            let _ = ask.send(Ask::Evict(evictor, cfg, tracked));
        }
    }

    /// The in-flight entries of a finished read, and the time it began.
    pub(super) fn take(&mut self) -> Option<(u64, Vec<ConnInfo>)> {
        let answer = self.answers.try_recv().ok()?;
        self.pending = false;
        if std::mem::take(&mut self.again) {
            self.request();
        }
        Some(answer)
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.ask = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Makes room (`evict.rs`): the whole table read here, its owners classified under `cfg` from
/// their /proc facts (read here, once per owner), unselected owners' entries dropped first, then
/// workloads' beyond their share, then the idle longest; each chosen record re-read and deleted
/// only if it still holds the request chosen.
fn evict(
    table: &mut ConnsReader,
    evictor: &Evictor,
    cfg: &Config,
    tracked: u64,
    report: &EvictReport,
) {
    let conns: Vec<ConnInfo> = table.records().into_iter().map(|r| r.info).collect();
    let mut facts = process::FactsCache::new(policy::uses_lineage(cfg));
    let (chosen, workloads) = evictor.plan(cfg, &conns, |tgid| facts.get(tgid, tgid));
    let mut dropped: HashMap<&'static str, u64> = HashMap::new();
    for v in &chosen {
        if table.drop_if_same(v) {
            *dropped.entry(v.reason.label()).or_default() += 1;
        }
    }
    for (reason, n) in &dropped {
        report
            .dropped
            .get_or_create(&crate::metrics::ReasonLabels {
                reason: (*reason).into(),
            })
            .inc_by(*n);
    }
    if !dropped.is_empty() {
        warn!(
            unselected = dropped.get("unselected").copied().unwrap_or(0),
            over_quota = dropped.get("over_quota").copied().unwrap_or(0),
            idle = dropped.get("idle").copied().unwrap_or(0),
            workloads,
            tracked,
            max = report.max,
            "connection table past its high-water mark: dropped unselected owners' connections, workloads' beyond their share, then the idle longest"
        );
    }
}
