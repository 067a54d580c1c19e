//! Live processes a policy's selector covers, for the `min_workers` floor: a scan of every
//! process in /proc, made on a thread of its own every `SCAN_EVERY` for the policies that have
//! a floor, never on the acting thread. The acting thread takes the latest counts by channel
//! and judges the floor on the last count less the actions taken since that scan began: each
//! action is taken to have cost a worker until a scan shows otherwise, so the floor is never
//! judged on a count from before an action.

use std::{
    cell::RefCell,
    sync::mpsc::{self, Receiver, Sender},
    time::Instant,
};

use super::*;
use crate::config::Selector;

const SCAN_EVERY: Duration = Duration::from_millis(250);

type Counts = Vec<(String, usize, Instant)>;

pub(super) struct Workers {
    /// Per policy: the last scan's count and when that scan began.
    counts: RefCell<HashMap<String, (usize, Instant)>>,
    /// Per policy: when its actions were taken (those after its last scan began).
    acted: RefCell<HashMap<String, Vec<Instant>>>,
    scans: Receiver<Counts>,
    ask: Sender<Vec<(String, Selector)>>,
}

impl Workers {
    /// Starts the counting thread (idle until a policy with a floor is configured).
    pub(super) fn start() -> anyhow::Result<Self> {
        let (ask, asked) = mpsc::channel::<Vec<(String, Selector)>>();
        let (tx, scans) = mpsc::channel::<Counts>();
        std::thread::Builder::new()
            .name("watchdog-workers".into())
            .spawn(move || {
                let mut policies = Vec::new();
                loop {
                    let wait = if policies.is_empty() {
                        Duration::from_secs(3600)
                    } else {
                        SCAN_EVERY
                    };
                    match asked.recv_timeout(wait) {
                        Ok(p) => policies = p,
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    if policies.is_empty() {
                        continue;
                    }
                    let at = Instant::now();
                    let counts = count_selected(&policies)
                        .into_iter()
                        .map(|(name, n)| (name, n, at))
                        .collect();
                    if tx.send(counts).is_err() {
                        return;
                    }
                }
            })
            .context("starting the worker-counting thread")?;
        Ok(Self {
            counts: RefCell::default(),
            acted: RefCell::default(),
            scans,
            ask,
        })
    }

    /// The policies with a floor, after a load or reload: counted from now on.
    pub(super) fn configure(&self, policies: &[Arc<Policy>]) {
        let floors = policies
            .iter()
            .filter(|p| p.min_workers.is_some())
            .map(|p| (p.name.clone(), p.selector.clone()))
            .collect();
        let _ = self.ask.send(floors);
    }

    /// Workers the policy's selector covers now, as far as known: the last scan's count less
    /// the actions taken since it began. Before the first scan of a policy (the moments after
    /// a load), a scan made here, once.
    pub(super) fn count(&self, policy: &str, sel: &Selector) -> usize {
        let mut counts = self.counts.borrow_mut();
        while let Ok(scan) = self.scans.try_recv() {
            for (name, n, at) in scan {
                counts.insert(name, (n, at));
            }
        }
        let (n, at) = *counts.entry(policy.to_string()).or_insert_with(|| {
            let at = Instant::now();
            let n = count_selected(&[(policy.to_string(), sel.clone())])
                .pop()
                .map_or(0, |(_, n)| n);
            (n, at)
        });
        let mut acted = self.acted.borrow_mut();
        let since = acted.entry(policy.to_string()).or_default();
        since.retain(|t| *t >= at);
        n.saturating_sub(since.len())
    }

    /// An action of `policy` was carried out: it counts as one worker less until a scan that
    /// began after it.
    pub(super) fn forget(&self, policy: &str) {
        self.acted
            .borrow_mut()
            .entry(policy.to_string())
            .or_default()
            .push(Instant::now());
    }
}

/// One pass over /proc: each policy's count of live, non-kernel processes it selects.
fn count_selected(policies: &[(String, Selector)]) -> Vec<(String, usize)> {
    let mut n = vec![0usize; policies.len()];
    if let Ok(all) = procfs::process::all_processes() {
        for f in all
            .filter_map(Result::ok)
            .filter_map(|p| process::facts(p.pid as u32, p.pid as u32))
            .filter(|f| !f.kernel_thread)
        {
            for (i, (_, sel)) in policies.iter().enumerate() {
                if policy::selects(sel, &f) {
                    n[i] += 1;
                }
            }
        }
    }
    policies.iter().map(|(p, _)| p.clone()).zip(n).collect()
}
