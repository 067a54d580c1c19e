//! Over-budget requests and their ladders: which step is due when. Plain data, no I/O.
//!
//! The kernel reports a request only when it is already late (deadline) or its caller left
//! (client gone); the tracker then holds that request's ladder until every step has run or
//! the request is found to have ended. Times are CLOCK_MONOTONIC nanoseconds, the clock of
//! `bpf_ktime_get_ns`.

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    sync::Arc,
};

use watchdog_common::ConnInfo;

use crate::{
    config::{Policy, Step},
    policy::nanos,
};

/// Why a ladder runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The request ran past its budget.
    Budget,
    /// The caller hung up while the request was in flight.
    ClientGone,
}

impl Reason {
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Budget => "budget",
            Reason::ClientGone => "client_gone",
        }
    }
}

/// One request's ladder: (connection, request generation, reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub cookie: u64,
    pub gen: u32,
    pub reason: Reason,
}

#[derive(Clone, Debug)]
pub struct Ladder {
    pub conn: ConnInfo,
    /// The policy as it was when the ladder started: a reload does not change it.
    pub policy: Arc<Policy>,
    pub steps: Vec<Step>,
    /// When step offsets count from.
    pub base_ns: u64,
    /// Index of the next step to run.
    pub next: usize,
}

impl Ladder {
    fn due_at(&self, i: usize) -> u64 {
        self.base_ns.saturating_add(nanos(self.steps[i].after))
    }
}

/// A step that is due now.
#[derive(Clone, Debug)]
pub struct Due {
    pub key: Key,
    pub step: Step,
    /// Index of the step in its ladder (0 = first).
    pub index: usize,
    /// When it was due.
    pub due_ns: u64,
    pub conn: ConnInfo,
    pub policy: Arc<Policy>,
}

/// Keeps the last few thousand finished ladders so a repeated event does not start them again.
const FINISHED_MEMORY: usize = 4096;

#[derive(Default)]
pub struct Tracker {
    ladders: HashMap<Key, Ladder>,
    queue: BTreeSet<(u64, Key)>,
    finished: HashSet<Key>,
    finished_order: VecDeque<Key>,
}

impl Tracker {
    /// Starts a ladder; false if this request already has (or had) one for this reason.
    pub fn admit(
        &mut self,
        key: Key,
        conn: ConnInfo,
        policy: Arc<Policy>,
        steps: Vec<Step>,
        base_ns: u64,
    ) -> bool {
        if steps.is_empty() || self.ladders.contains_key(&key) || self.finished.contains(&key) {
            return false;
        }
        let ladder = Ladder {
            conn,
            policy,
            steps,
            base_ns,
            next: 0,
        };
        self.queue.insert((ladder.due_at(0), key));
        self.ladders.insert(key, ladder);
        true
    }

    /// When the next step is due.
    pub fn next_due(&self) -> Option<u64> {
        self.queue.first().map(|(t, _)| *t)
    }

    /// Removes and returns every step due at `now`, advancing each ladder. Steps of one ladder
    /// due at the same instant come out in order.
    pub fn pop_due(&mut self, now: u64) -> Vec<Due> {
        let mut out = Vec::new();
        while let Some(&(t, key)) = self.queue.first() {
            if t > now {
                break;
            }
            self.queue.pop_first();
            let Some(l) = self.ladders.get_mut(&key) else {
                continue;
            };
            let index = l.next;
            out.push(Due {
                key,
                step: l.steps[index],
                index,
                due_ns: t,
                conn: l.conn,
                policy: l.policy.clone(),
            });
            l.next += 1;
            if l.next < l.steps.len() {
                let at = l.due_at(l.next);
                self.queue.insert((at, key));
            } else {
                self.finish(key);
            }
        }
        out
    }

    /// Drops a ladder (the request ended, its owner is gone, or it was refused).
    pub fn finish(&mut self, key: Key) {
        if let Some(l) = self.ladders.remove(&key) {
            if l.next < l.steps.len() {
                self.queue.remove(&(l.due_at(l.next), key));
            }
        }
        if self.finished.insert(key) {
            self.finished_order.push_back(key);
            if self.finished_order.len() > FINISHED_MEMORY {
                if let Some(old) = self.finished_order.pop_front() {
                    self.finished.remove(&old);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.ladders.len()
    }
}

/// False for a kernel event that mixes two requests: read by the timer callback while the next
/// request on the connection was being written (the fields are plain memory, not one atomic
/// unit), it names the new generation with the old start time. `current` is the connection's
/// record read back after the event arrived, when that write has long finished. Such an event
/// must not start a ladder: it would find the new request "over budget" at once, and its key
/// would shadow that request's real deadline event.
pub fn consistent(event: &ConnInfo, current: Option<&ConnInfo>) -> bool {
    match current {
        Some(now) if now.gen == event.gen => now.start_ns == event.start_ns,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nix::sys::signal::Signal;

    use super::*;
    use crate::config::{Action, BreakerConfig, Mode, Selector, Sig, Target};

    const MS: u64 = 1_000_000;

    fn policy() -> Arc<Policy> {
        let step = |ms, sig| Step {
            after: Duration::from_millis(ms),
            action: Action::Signal(Sig(sig)),
            target: Target::Process,
        };
        Arc::new(Policy {
            name: "p".into(),
            ports: vec![],
            budget: Duration::from_millis(100),
            steps: vec![
                step(100, Signal::SIGUSR1),
                step(200, Signal::SIGTERM),
                step(200, Signal::SIGKILL),
            ],
            selector: Selector::default(),
            mode: Mode::Enforce,
            client_gone: None,
            breaker: BreakerConfig::default(),
            min_workers: None,
        })
    }

    fn key(cookie: u64, gen: u32) -> Key {
        Key {
            cookie,
            gen,
            reason: Reason::Budget,
        }
    }

    #[test]
    fn steps_come_out_at_their_offsets_in_order() {
        let mut t = Tracker::default();
        let p = policy();
        assert!(t.admit(
            key(1, 1),
            ConnInfo::default(),
            p.clone(),
            p.steps.clone(),
            1000 * MS
        ));
        assert_eq!(t.next_due(), Some(1100 * MS));
        assert!(t.pop_due(1099 * MS).is_empty());
        let d = t.pop_due(1100 * MS);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].index, 0);
        let d = t.pop_due(1250 * MS);
        assert_eq!(d.iter().map(|d| d.index).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(t.len(), 0);
        assert!(
            !t.admit(
                key(1, 1),
                ConnInfo::default(),
                p.clone(),
                p.steps.clone(),
                0
            ),
            "never twice"
        );
        assert!(
            t.admit(
                key(1, 2),
                ConnInfo::default(),
                p.clone(),
                p.steps.clone(),
                0
            ),
            "next request is new"
        );
    }

    #[test]
    fn an_event_that_mixes_two_requests_is_refused() {
        let ev = ConnInfo {
            gen: 8,
            start_ns: 100,
            ..ConnInfo::default()
        };
        let same = ev;
        let torn = ConnInfo {
            start_ns: 5_000,
            ..ev
        };
        let later = ConnInfo {
            gen: 9,
            start_ns: 9_000,
            ..ev
        };
        assert!(consistent(&ev, Some(&same)));
        assert!(!consistent(&ev, Some(&torn)));
        // A later request or a closed connection: the usual checks at action time decide.
        assert!(consistent(&ev, Some(&later)));
        assert!(consistent(&ev, None));
    }

    #[test]
    fn finish_cancels_remaining_steps() {
        let mut t = Tracker::default();
        let p = policy();
        t.admit(
            key(1, 1),
            ConnInfo::default(),
            p.clone(),
            p.steps.clone(),
            0,
        );
        t.pop_due(100 * MS);
        t.finish(key(1, 1));
        assert_eq!(t.next_due(), None);
        assert!(t.pop_due(u64::MAX).is_empty());
    }

    proptest::proptest! {
        /// Whatever the interleaving of admits, finishes and clock advances: every step of a
        /// ladder comes out at most once, never before it is due, in ladder order.
        #[test]
        fn each_step_at_most_once_never_early(ops in proptest::collection::vec((0u8..3, 0u64..4, 0u32..3, 0u64..500), 1..300)) {
            let mut t = Tracker::default();
            let p = policy();
            let mut now = 0u64;
            let mut seen: HashMap<Key, Vec<usize>> = HashMap::new();
            for (op, cookie, gen, dt) in ops {
                match op {
                    0 => { t.admit(key(cookie, gen), ConnInfo::default(), p.clone(), p.steps.clone(), now); }
                    1 => t.finish(key(cookie, gen)),
                    _ => {
                        now += dt * MS;
                        for d in t.pop_due(now) {
                            proptest::prop_assert!(d.due_ns <= now);
                            let v = seen.entry(d.key).or_default();
                            proptest::prop_assert_eq!(v.len(), d.index, "in order, once each");
                            v.push(d.index);
                        }
                    }
                }
            }
        }
    }
}
