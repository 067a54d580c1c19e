//! Over-budget requests and their ladders: which step is due when. Plain data, no I/O.
//!
//! The kernel reports a request only when it is already late (deadline) or its caller left
//! (client gone); the tracker then holds that request's ladder until every step has run or
//! the request is found to have ended. Times are CLOCK_MONOTONIC nanoseconds, the clock of
//! `bpf_ktime_get_ns`.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::Arc,
};

use watchdog_common::{ConnInfo, ReqState, TaskInfo};

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

/// What a ladder is about, for its records: the request as the kernel saw it and its route.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct About {
    /// `GET /reports/2024`, a statement's start; `None` if its bytes were not readable.
    pub request: Option<String>,
    /// The route's pattern, `default` or `unknown` (a bounded metrics label).
    pub route: String,
    pub protocol: &'static str,
    /// The budget that ran out: the route's, or the policy's.
    pub budget: std::time::Duration,
    /// When the kernel emitted the event that started the ladder (`bpf_ktime_get_ns`).
    pub event_ns: u64,
}

#[derive(Clone, Debug)]
pub struct Ladder {
    pub conn: ConnInfo,
    pub about: Arc<About>,
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
    pub about: Arc<About>,
    pub policy: Arc<Policy>,
}

/// Keeps the last few thousand finished ladders so a repeated event does not start them again.
const FINISHED_MEMORY: usize = 4096;

#[derive(Default)]
pub struct Tracker {
    ladders: HashMap<Key, Ladder>,
    queue: BTreeSet<(u64, Key)>,
    /// Finished ladders, with the `start_ns` of the request they were about: a request whose
    /// clock the kernel restarted (its head came in whole, `conn_flag::HEAD_PENDING`) is a new
    /// ladder under the same key.
    finished: HashMap<Key, u64>,
    finished_order: VecDeque<Key>,
}

impl Tracker {
    /// Starts a ladder; false if this request already has (or had) one for this reason.
    pub fn admit(
        &mut self,
        key: Key,
        conn: ConnInfo,
        about: Arc<About>,
        policy: Arc<Policy>,
        steps: Vec<Step>,
        base_ns: u64,
    ) -> bool {
        if steps.is_empty() || self.finished.get(&key) == Some(&conn.start_ns) {
            return false;
        }
        match self.ladders.get(&key) {
            // The same request's clock restarted later: its old ladder gives way.
            Some(l) if l.conn.start_ns < conn.start_ns => {
                if l.next < l.steps.len() {
                    self.queue.remove(&(l.due_at(l.next), key));
                }
                self.ladders.remove(&key);
            }
            Some(_) => return false,
            None => {}
        }
        let ladder = Ladder {
            conn,
            about,
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
    #[cfg(test)]
    pub fn pop_due(&mut self, now: u64) -> Vec<Due> {
        self.pop_due_at_most(now, usize::MAX)
    }

    /// `pop_due`, at most `max` steps: the earliest due come out first, the rest stay due.
    pub fn pop_due_at_most(&mut self, now: u64, max: usize) -> Vec<Due> {
        let mut out = Vec::new();
        while let Some(&(t, key)) = self.queue.first() {
            if t > now || out.len() >= max {
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
                about: l.about.clone(),
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
        let mut start_ns = 0;
        if let Some(l) = self.ladders.remove(&key) {
            start_ns = l.conn.start_ns;
            if l.next < l.steps.len() {
                self.queue.remove(&(l.due_at(l.next), key));
            }
        }
        let first = self.finished.insert(key, start_ns).is_none();
        if first {
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

/// Is the request of `ev` still the one in flight, owned by the same task, as the kernel says
/// now? `task` is `TASKS[ev.tid]` and `conn` is `CONNS[ev.cookie]`, read just before acting. A
/// reused tid never matches: its life stamp is the time the new task first owned a request. A
/// connection the peer already reset is gone from `CONNS`: a client-gone ladder may still act
/// then, if the owner has not moved on to another request.
pub fn still_current(
    reason: Reason,
    ev: &ConnInfo,
    task: Option<&TaskInfo>,
    conn: Option<&ConnInfo>,
) -> bool {
    let Some(task) = task else {
        // Owner life 0: the task table was full when the request started, so the kernel flagged
        // it `UNARMED` for the backstop. Current while the connection still names this request
        // and this tid, and no task has since been recorded under the tid (that would be another
        // life). Limit: an owner that exits mid-request leaves no trace to delete; a new thread
        // reusing its tid before the deadline, and never owning a request, would match. Only
        // when the table is full; the pidfd's start time check closes it.
        return ev.owner_life == 0
            && conn.is_some_and(|now| {
                now.state == ReqState::InFlight as u32
                    && now.gen == ev.gen
                    && now.tid == ev.tid
                    && now.owner_life == 0
            });
    };
    if task.life != ev.owner_life {
        return false;
    }
    match conn {
        Some(now) => now.state == ReqState::InFlight as u32 && now.gen == ev.gen,
        None => {
            reason == Reason::ClientGone && task.cur_cookie == ev.cookie && task.cur_gen == ev.gen
        }
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
    use std::{collections::HashSet, time::Duration};

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
            routes: vec![],
            stacks: true,
            upgrades: true,
            mysql: None,
        })
    }

    fn key(cookie: u64, gen: u32) -> Key {
        Key {
            cookie,
            gen,
            reason: Reason::Budget,
        }
    }

    /// A request the kernel could not give a task-table entry (owner life 0, the table full):
    /// current while the connection still names it and no task holds its tid; never once a task
    /// (another life) holds the tid, the request moved on, or the owner changed.
    #[test]
    fn an_owner_without_a_task_entry_is_current_only_while_nothing_else_holds_its_tid() {
        let ev = ConnInfo {
            cookie: 7,
            gen: 3,
            tid: 42,
            owner_life: 0,
            state: ReqState::InFlight as u32,
            ..ConnInfo::default()
        };
        for reason in [Reason::Budget, Reason::ClientGone] {
            assert!(still_current(reason, &ev, None, Some(&ev)));
            let other = TaskInfo {
                life: 99,
                ..TaskInfo::default()
            };
            assert!(!still_current(reason, &ev, Some(&other), Some(&ev)));
            for moved in [
                ConnInfo { gen: 4, ..ev },
                ConnInfo {
                    state: ReqState::Idle as u32,
                    ..ev
                },
                ConnInfo { tid: 43, ..ev },
                ConnInfo {
                    owner_life: 5,
                    ..ev
                },
            ] {
                assert!(!still_current(reason, &ev, None, Some(&moved)));
            }
            assert!(!still_current(reason, &ev, None, None));
            // A recorded owner (life != 0) is never current without its entry.
            let owned = ConnInfo {
                owner_life: 5,
                ..ev
            };
            assert!(!still_current(reason, &owned, None, Some(&owned)));
        }
    }

    #[test]
    fn steps_come_out_at_their_offsets_in_order() {
        let mut t = Tracker::default();
        let p = policy();
        assert!(t.admit(
            key(1, 1),
            ConnInfo::default(),
            Arc::default(),
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
                Arc::default(),
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
                Arc::default(),
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
            Arc::default(),
            p.clone(),
            p.steps.clone(),
            0,
        );
        t.pop_due(100 * MS);
        t.finish(key(1, 1));
        assert_eq!(t.next_due(), None);
        assert!(t.pop_due(u64::MAX).is_empty());
    }

    /// A model of the kernel's request tables for one connection (cookie 1) served by tids 1..=3,
    /// following the rules of `watchdog-ebpf` (request start, end, close, task exit, tid reuse),
    /// with each task incarnation also given a serial number the daemon never sees.
    #[derive(Default)]
    struct Model {
        clock: u64,
        conn: Option<ConnInfo>,
        /// tid → (TaskInfo as in TASKS, incarnation serial).
        tasks: HashMap<u32, (TaskInfo, u32)>,
        serial: u32,
        gen: u32,
        /// (event, the incarnation that owned its request).
        events: Vec<(ConnInfo, u32)>,
        /// Incarnations (by serial) that have exited.
        dead: HashSet<u32>,
        /// Incarnation serial → generation of the last request it started.
        latest: HashMap<u32, u32>,
        /// The incarnation that started the request now on connection 1.
        conn_owner: u32,
    }

    impl Model {
        fn tick(&mut self) -> u64 {
            self.clock += 1;
            self.clock
        }
        fn start(&mut self, tid: u32) {
            let now = self.tick();
            if self
                .conn
                .is_none_or(|c| c.state == ReqState::InFlight as u32)
            {
                return;
            }
            let life = self.own(tid, 1, now);
            self.conn_owner = self.tasks[&tid].1;
            let c = self.conn.as_mut().unwrap();
            *c = ConnInfo {
                cookie: 1,
                gen: self.gen,
                state: ReqState::InFlight as u32,
                tid,
                owner_life: life,
                start_ns: now,
                ..*c
            };
        }
        /// `tid` starts a request on another connection (cookie 2), which this model does not
        /// follow further: it makes a task (or a new incarnation of a reused tid) an owner
        /// without touching connection 1.
        fn start_elsewhere(&mut self, tid: u32) {
            let now = self.tick();
            self.own(tid, 2, now);
        }
        /// A new request generation owned by `tid` on `cookie`, as the kernel's `task_life`
        /// records it (a tid not in the table is a new incarnation, stamped `now`). Its life.
        fn own(&mut self, tid: u32, cookie: u64, now: u64) -> u64 {
            self.gen += 1;
            if !self.tasks.contains_key(&tid) {
                self.serial += 1;
                let t = TaskInfo {
                    life: now,
                    ..TaskInfo::default()
                };
                self.tasks.insert(tid, (t, self.serial));
            }
            let (t, serial) = self.tasks.get_mut(&tid).unwrap();
            self.latest.insert(*serial, self.gen);
            t.cur_cookie = cookie;
            t.cur_gen = self.gen;
            t.life
        }
        /// The timer fires or the peer hangs up: an event with the record as it is now.
        fn event(&mut self) {
            if let Some(c) = self.conn.filter(|c| c.state == ReqState::InFlight as u32) {
                self.events.push((c, self.conn_owner));
            }
        }
    }

    proptest::proptest! {
        /// Over any sequence of request starts, ends, closes, reconnects, task exits and tid
        /// reuse, with events checked in any order and at any later time: the daemon deems an
        /// event's request current only if it is the request in flight on its connection (or,
        /// for a reset connection, the owner's latest) and its owner is the very same task.
        #[test]
        fn only_the_same_request_of_the_same_task_is_current(
            ops in proptest::collection::vec((0u8..8, 1u32..4, 0usize..8), 1..200),
        ) {
            let mut m = Model { conn: Some(ConnInfo { cookie: 1, ..ConnInfo::default() }), ..Model::default() };
            for (op, tid, pick) in ops {
                match op {
                    0 | 1 => m.start(tid),
                    2 => { if let Some(c) = m.conn.as_mut() { c.state = ReqState::Idle as u32; } }
                    3 => m.event(),
                    4 => {
                        // The task exits (its tid may be handed out again: a later start with
                        // the same tid is a new incarnation).
                        if let Some((_, s)) = m.tasks.remove(&tid) { m.dead.insert(s); }
                        m.tick();
                    }
                    6 => m.start_elsewhere(tid),
                    5 => { if m.conn.is_some() { m.conn = None; } else { m.conn = Some(ConnInfo { cookie: 1, ..ConnInfo::default() }); } }
                    _ => {
                        if m.events.is_empty() { continue; }
                        let (ev, owner) = m.events[pick % m.events.len()];
                        let task = m.tasks.get(&ev.tid).map(|(t, _)| *t);
                        for reason in [Reason::Budget, Reason::ClientGone] {
                            // The truth, from the model's own books (incarnation serials the
                            // daemon never sees): the owner is the same, living incarnation, and
                            // its request is the one in flight on the connection (or, the
                            // connection reset, a client-gone whose owner started nothing since).
                            let same_owner = m.tasks.get(&ev.tid).is_some_and(|(_, s)| *s == owner)
                                && !m.dead.contains(&owner);
                            let truth = same_owner
                                && match m.conn {
                                    Some(c) => c.state == ReqState::InFlight as u32 && c.gen == ev.gen,
                                    None => reason == Reason::ClientGone && m.latest[&owner] == ev.gen,
                                };
                            let said = still_current(reason, &ev, task.as_ref(), m.conn.as_ref());
                            // Both directions: never current when it is not (soundness), and
                            // always current when it is (an always-false check fails here).
                            proptest::prop_assert_eq!(said, truth, "{:?} {:?} task {:?} conn {:?}", reason, ev, task, m.conn);
                            if !said {
                                continue;
                            }
                            let (_, serial) = m.tasks[&ev.tid];
                            proptest::prop_assert_eq!(serial, owner, "the same task incarnation");
                            proptest::prop_assert!(!m.dead.contains(&owner));
                            match m.conn {
                                Some(c) => {
                                    proptest::prop_assert_eq!(c.tid, ev.tid);
                                    proptest::prop_assert_eq!(c.gen, ev.gen);
                                    proptest::prop_assert_eq!(c.state, ReqState::InFlight as u32);
                                }
                                None => {
                                    proptest::prop_assert_eq!(reason, Reason::ClientGone);
                                    proptest::prop_assert_eq!(m.latest[&owner], ev.gen, "the owner started nothing since");
                                }
                            }
                        }
                    }
                }
            }
        }

        /// Whatever the interleaving of admits, finishes and clock advances: every step of a
        /// ladder comes out at most once, in ladder order, at the time its own base and offset
        /// say (computed here, not taken from the tracker), never before it is due; and once
        /// `pop_due(now)` returns, no live ladder still has a step due at `now` (none is late or
        /// lost).
        #[test]
        fn each_step_once_at_its_offset_and_none_left_behind(ops in proptest::collection::vec((0u8..3, 0u64..4, 0u32..3, 0u64..500), 1..300)) {
            let mut t = Tracker::default();
            let p = policy();
            let mut now = 0u64;
            let mut seen: HashMap<Key, Vec<usize>> = HashMap::new();
            // Key → base of its ladder, for ladders admitted and not finished or completed.
            let mut live: HashMap<Key, u64> = HashMap::new();
            let mut ever: HashSet<Key> = HashSet::new();
            let due = |base: u64, i: usize| base + p.steps[i].after.as_nanos() as u64;
            for (op, cookie, gen, dt) in ops {
                let k = key(cookie, gen);
                match op {
                    0 => {
                        let admitted = t.admit(k, ConnInfo::default(), Arc::default(), p.clone(), p.steps.clone(), now);
                        // Admitted exactly when this request never had a ladder.
                        proptest::prop_assert_eq!(admitted, ever.insert(k));
                        if admitted { live.insert(k, now); }
                    }
                    // A finished request never gets a ladder again, even if it had none.
                    1 => { t.finish(k); live.remove(&k); ever.insert(k); }
                    _ => {
                        now += dt * MS;
                        for d in t.pop_due(now) {
                            let base = live.get(&d.key).copied();
                            proptest::prop_assert!(base.is_some(), "a step of a finished ladder: {:?}", d.key);
                            proptest::prop_assert_eq!(d.due_ns, due(base.unwrap(), d.index));
                            proptest::prop_assert!(d.due_ns <= now);
                            let v = seen.entry(d.key).or_default();
                            proptest::prop_assert_eq!(v.len(), d.index, "in order, once each");
                            v.push(d.index);
                            if d.index + 1 == p.steps.len() { live.remove(&d.key); }
                        }
                        for (k, base) in &live {
                            let next = seen.get(k).map_or(0, Vec::len);
                            proptest::prop_assert!(due(*base, next) > now, "{:?} step {} due at {} left behind at {}", k, next, due(*base, next), now);
                        }
                    }
                }
            }
        }
    }
}
