//! The backstop for requests whose kernel deadline path failed. Plain data, no I/O.
//!
//! The kernel keeps one `bpf_timer` per connection armed for the request in flight and writes an
//! event when it fires on a request that is due. Two things can break that chain, and the kernel marks the request when they
//! do (`ConnInfo::flags`):
//! - `UNARMED`: `bpf_timer_init` allocates with GFP_ATOMIC and fails with ENOMEM when the
//!   daemon's memory cgroup is under pressure (seen here under a burst of 300 accepts);
//! - `EVENT_LOST`: the timer fired but the ring buffer was full.
//!
//! Both bump a kernel counter. When either counter moves, the daemon sweeps the connection table
//! and hands every marked request to the same path a kernel deadline event takes: at once if its
//! deadline has passed, else when it comes: then only the marked requests are read back, not the
//! table again (a sweep of 50,000 connections costs about 0.1 s of syscalls). Nothing is swept
//! while nothing fails.

use std::collections::HashMap;

use watchdog_common::{conn_flag, ConnInfo, ReqState};

/// Why a request came from the sweep rather than from a kernel event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovered {
    /// Its timer could not be armed.
    Unarmed,
    /// Its deadline event was lost.
    EventLost,
}

impl Recovered {
    pub fn label(&self) -> &'static str {
        match self {
            Recovered::Unarmed => "timer_unarmed",
            Recovered::EventLost => "event_lost",
        }
    }
}

/// What to read from the kernel now.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    Nothing,
    /// The whole connection table (`sweep`).
    Table,
    /// These connections only (`recheck`): marked requests whose deadline has come.
    Marked(Vec<u64>),
}

/// What the sweep remembers between runs.
#[derive(Debug, Default)]
pub struct Backstop {
    /// Sum of the kernel's failure counters at the last sweep.
    failures: u64,
    /// A sweep of the whole table is owed (at start).
    table_owed: bool,
    /// Marked requests not yet due: cookie → deadline.
    waiting: HashMap<u64, u64>,
    /// The earliest deadline in `waiting`.
    next_at: Option<u64>,
    /// Marked requests already handed over, by cookie: never handed over twice.
    handed: HashMap<u64, u32>,
}

impl Backstop {
    /// Starts from the kernel's counters as they are: a fresh daemon sweeps only on new failures,
    /// and sweeps once at start (`due_now`) to pick up what an earlier daemon left marked.
    pub fn new(failures: u64) -> Self {
        Self {
            failures,
            table_owed: true,
            ..Self::default()
        }
    }

    /// Owes a sweep of the whole table (after the event ring had to be reopened).
    pub fn owe_sweep(&mut self) {
        self.table_owed = true;
    }

    /// What must be read now? `failures` is the kernel's timer-start errors plus lost events,
    /// summed.
    pub fn plan(&mut self, failures: u64, now_ns: u64) -> Plan {
        let moved = failures != self.failures;
        self.failures = failures;
        if moved || std::mem::take(&mut self.table_owed) {
            return Plan::Table;
        }
        if self.next_at.is_none_or(|t| t > now_ns) {
            return Plan::Nothing;
        }
        let due: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, deadline)| **deadline <= now_ns)
            .map(|(cookie, _)| *cookie)
            .collect();
        if due.is_empty() {
            Plan::Nothing
        } else {
            Plan::Marked(due)
        }
    }

    /// Sweeps `conns` (the whole table): returns the marked requests whose deadline has passed
    /// and that were not handed over before, and remembers the ones still ahead.
    pub fn sweep(&mut self, conns: &[ConnInfo], now_ns: u64) -> Vec<(ConnInfo, Recovered)> {
        self.waiting.clear();
        // Forget requests that ended or whose connection closed: the table bounds the memory.
        let handed = std::mem::take(&mut self.handed);
        let mut out = Vec::new();
        for c in conns {
            if handed.get(&c.cookie) == Some(&c.gen) && c.state == ReqState::InFlight as u32 {
                self.handed.insert(c.cookie, c.gen);
                continue;
            }
            self.consider(c, now_ns, &mut out);
        }
        self.next_at = self.waiting.values().min().copied();
        out
    }

    /// Reads back the connections of `Plan::Marked` (`conns`: those of `asked` still in the
    /// table): the same decision as `sweep`, for them only.
    pub fn recheck(
        &mut self,
        asked: &[u64],
        conns: &[ConnInfo],
        now_ns: u64,
    ) -> Vec<(ConnInfo, Recovered)> {
        for cookie in asked {
            self.waiting.remove(cookie);
        }
        let mut out = Vec::new();
        for c in conns {
            if self.handed.get(&c.cookie) != Some(&c.gen) {
                self.consider(c, now_ns, &mut out);
            }
        }
        self.next_at = self.waiting.values().min().copied();
        out
    }

    /// A marked request in flight is handed over if due, else waits for its deadline.
    fn consider(&mut self, c: &ConnInfo, now_ns: u64, out: &mut Vec<(ConnInfo, Recovered)>) {
        if c.state != ReqState::InFlight as u32 {
            return;
        }
        let why = if c.flags & conn_flag::EVENT_LOST != 0 {
            Recovered::EventLost
        } else if c.flags & conn_flag::UNARMED != 0 {
            Recovered::Unarmed
        } else {
            return;
        };
        let deadline = c.start_ns.saturating_add(c.deadline_ns);
        if deadline <= now_ns {
            self.handed.insert(c.cookie, c.gen);
            out.push((*c, why));
        } else {
            self.waiting.insert(c.cookie, deadline);
        }
    }

    /// When the earliest marked request not yet due comes due, if there is one.
    pub fn next_at(&self) -> Option<u64> {
        self.next_at
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn conn(cookie: u64, gen: u32, start: u64, deadline: u64, flags: u32) -> ConnInfo {
        ConnInfo {
            cookie,
            gen,
            start_ns: start,
            deadline_ns: deadline,
            flags,
            state: ReqState::InFlight as u32,
            ..ConnInfo::default()
        }
    }

    #[test]
    fn sweeps_only_when_a_failure_counter_moves_or_a_marked_deadline_comes() {
        let mut b = Backstop::new(5);
        assert_eq!(b.plan(5, 0), Plan::Table, "one sweep at start");
        assert!(b.sweep(&[], 0).is_empty());
        assert_eq!(b.plan(5, 1_000), Plan::Nothing, "nothing failed: no sweep");
        assert_eq!(b.plan(6, 2_000), Plan::Table, "a new failure: sweep");
        let late = conn(1, 1, 1_000, 5_000, conn_flag::UNARMED);
        let other = conn(2, 1, 1_000, 9_000, conn_flag::EVENT_LOST);
        assert!(b.sweep(&[late, other], 2_000).is_empty(), "not due yet");
        assert_eq!(b.next_at(), Some(6_000));
        assert_eq!(b.plan(6, 5_999), Plan::Nothing);
        // Its deadline: only that connection is read back, not the table.
        assert_eq!(b.plan(6, 6_000), Plan::Marked(vec![1]));
        assert_eq!(
            b.recheck(&[1], &[late], 6_000),
            vec![(late, Recovered::Unarmed)]
        );
        assert_eq!(b.next_at(), Some(10_000));
        // The other one ended before its deadline: nothing to hand over.
        let mut ended = other;
        ended.state = ReqState::Idle as u32;
        assert_eq!(b.plan(6, 10_000), Plan::Marked(vec![2]));
        assert!(b.recheck(&[2], &[ended], 10_000).is_empty());
        assert_eq!(b.next_at(), None);
    }

    #[test]
    fn a_marked_request_is_handed_over_once_and_its_next_request_again() {
        let mut b = Backstop::new(0);
        let lost = conn(7, 3, 0, 10, conn_flag::EVENT_LOST);
        assert_eq!(b.sweep(&[lost], 100), vec![(lost, Recovered::EventLost)]);
        assert!(b.sweep(&[lost], 200).is_empty(), "same request: not again");
        let next = conn(7, 4, 150, 10, conn_flag::UNARMED);
        assert_eq!(b.sweep(&[next], 300), vec![(next, Recovered::Unarmed)]);
    }

    #[test]
    fn unmarked_or_ended_requests_are_left_to_the_kernel() {
        let mut b = Backstop::new(0);
        let armed = conn(1, 1, 0, 10, 0);
        let mut ended = conn(2, 1, 0, 10, conn_flag::UNARMED);
        ended.state = ReqState::Idle as u32;
        assert!(b.sweep(&[armed, ended], 1_000).is_empty());
        assert_eq!(b.next_at(), None);
    }

    proptest! {
        /// Over any sequence of sweeps of a changing table, each (cookie, gen) marked and overdue
        /// is handed over exactly once while it stays in the table, and never before its deadline.
        #[test]
        fn each_overdue_marked_request_is_handed_over_exactly_once(
            reqs in proptest::collection::vec((0u64..8, 1u32..3, 0u64..1_000, 0u64..1_000, 0u32..4), 0..24),
            times in proptest::collection::vec(0u64..3_000, 1..10),
        ) {
            let mut times = times;
            times.sort_unstable();
            // One table for the whole run: the last entry per cookie wins.
            let mut table: HashMap<u64, ConnInfo> = HashMap::new();
            for (cookie, gen, start, deadline, flags) in reqs {
                table.insert(cookie, conn(cookie, gen, start, deadline, flags));
            }
            let conns: Vec<ConnInfo> = table.values().copied().collect();
            let mut b = Backstop::new(0);
            let mut handed: HashMap<(u64, u32), usize> = HashMap::new();
            for (i, now) in times.iter().enumerate() {
                // Full sweeps when a counter moves (every third time here), else read back only
                // the marked requests the plan names, as the daemon does.
                let out = match b.plan(i as u64 / 3, *now) {
                    Plan::Table => b.sweep(&conns, *now),
                    Plan::Marked(asked) => {
                        let back: Vec<ConnInfo> =
                            conns.iter().filter(|c| asked.contains(&c.cookie)).copied().collect();
                        b.recheck(&asked, &back, *now)
                    }
                    Plan::Nothing => Vec::new(),
                };
                for (c, _) in out {
                    prop_assert!(c.start_ns + c.deadline_ns <= *now);
                    *handed.entry((c.cookie, c.gen)).or_default() += 1;
                }
            }
            let last = *times.last().unwrap();
            for c in &conns {
                let expect = usize::from(c.flags != 0 && c.start_ns + c.deadline_ns <= last);
                prop_assert_eq!(handed.get(&(c.cookie, c.gen)).copied().unwrap_or(0), expect);
            }
        }
    }
}
