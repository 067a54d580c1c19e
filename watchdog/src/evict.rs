//! Who gives way when the connection table passes its high-water mark, so that no process can
//! leave a selected server's next connection untracked by filling the table. Pure: the daemon
//! reads the table, says who owns each entry (`Owner`, from the owner's /proc facts and the
//! policies' selectors: `owners`), asks `choose`, and deletes each chosen entry only if it is
//! still the same request when read again just before (`still_same`).
//!
//! In order, until the table is down to the low-water mark (never further):
//! 1. entries whose owner no policy selects on that port, idle or in flight (oldest first, idle
//!    before in flight): a process nobody watches takes no room;
//! 2. per-workload quotas: a workload (pod, cgroup, process: `breakers::Workload`) holding more
//!    than its share, `max(table / 4, table / workloads)`, loses its oldest idle, then in-flight,
//!    entries beyond that share;
//! 3. the idle connections idle longest (never-used ones first).
//!
//! A selected owner within its share never loses a request in flight. Dropping is fail-open: a
//! dropped connection's later requests are simply not followed (never acted on), and the kernel
//! counts nothing for them; a dropped request in flight loses its timer.
//!
//! The remaining race: the entry is read again and compared (`gen`) right before the delete,
//! but the map has no compare-and-delete, so a request that starts on that connection between
//! the re-read and the delete (a few microseconds) is dropped with it, untracked. Only entries
//! chosen above are exposed, and only for that window.

use std::collections::HashMap;

use watchdog_common::{conn_flag, ConnInfo, ReqState};

/// Start dropping at this share of the table, in percent...
pub const HIGH_WATER_PCT: u64 = 90;
/// ...down to this share.
pub const LOW_WATER_PCT: u64 = 75;
/// A workload may always hold this share of the table (1/4), more when there are fewer than
/// four workloads.
pub const MIN_SHARE_DIV: u64 = 4;

/// What the daemon knows of a connection's owner process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    /// Not known: the connection never carried a request (no owner yet), or its owner is gone.
    Unknown,
    /// No policy selects the owner on the connection's port.
    Unselected,
    /// A policy selects it; the workload it belongs to (an index the caller assigns).
    Selected(u32),
}

/// Why an entry was chosen (the `reason` label of `watchdog_connections_dropped_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Unselected,
    OverQuota,
    Idle,
}

impl Reason {
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Unselected => "unselected",
            Reason::OverQuota => "over_quota",
            Reason::Idle => "idle",
        }
    }
}

/// One entry to drop: its cookie, the request it held when read, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Victim {
    pub cookie: u64,
    pub gen: u32,
    pub reason: Reason,
}

/// Is the entry read again just before the delete (`now`) still what `v` chose? The same
/// request (no request started since: `gen` moves at every start) and, for an idle choice,
/// still idle.
pub fn still_same(v: &Victim, now: &ConnInfo) -> bool {
    now.cookie == v.cookie && now.gen == v.gen && (v.reason != Reason::Idle || droppable(now))
}

/// The owner of each (tgid, local port) among `records`: `classify` is asked once per pair
/// (tgid 0, no owner yet, is `Unknown` without asking). `Owner::Selected` indexes are the
/// caller's (one per workload).
pub fn owners(
    records: &[ConnInfo],
    mut classify: impl FnMut(u32, u16) -> Owner,
) -> HashMap<(u32, u16), Owner> {
    let mut out = HashMap::new();
    for c in records {
        out.entry((c.tgid, c.local_port)).or_insert_with(|| {
            if c.tgid == 0 {
                Owner::Unknown
            } else {
                classify(c.tgid, c.local_port)
            }
        });
    }
    out
}

/// The owner of a connection on `port` whose process has `facts` (`None`: gone) under `cfg`;
/// `workloads` numbers the selected owners' workloads (`breakers::Workload`) as they come.
pub fn classify(
    cfg: &crate::config::Config,
    port: u16,
    facts: Option<&crate::policy::ProcessFacts>,
    workloads: &mut Vec<crate::breakers::Workload>,
) -> Owner {
    let Some(f) = facts else {
        return Owner::Unknown;
    };
    if crate::policy::select(cfg, port, f).is_none() {
        return Owner::Unselected;
    }
    let w = crate::breakers::Workload::of(f, || crate::breakers::start_time(f.pid));
    let i = workloads.iter().position(|x| *x == w).unwrap_or_else(|| {
        workloads.push(w);
        workloads.len() - 1
    });
    Owner::Selected(i as u32)
}

/// When to look at the table again: the tracked count (`opened - closed`) that triggers a scan.
#[derive(Clone, Copy, Debug)]
pub struct Evictor {
    max: u64,
    /// No scan until the tracked count reaches this (the high-water mark, or more after a scan
    /// that found too few idle connections: a dropped connection stays counted until it closes).
    next_scan_at: u64,
}

impl Evictor {
    pub fn new(max_connections: u32) -> Self {
        let max = u64::from(max_connections);
        Self {
            max,
            next_scan_at: max * HIGH_WATER_PCT / 100,
        }
    }

    /// Should the table be scanned, with `tracked` connections open?
    pub fn due(&self, tracked: u64) -> bool {
        tracked >= self.next_scan_at
    }

    /// After a scan at `tracked`: the next one waits until as many connections again as the
    /// gap between the marks have arrived.
    pub fn scanned(&mut self, tracked: u64) {
        let gap = self.max * (HIGH_WATER_PCT - LOW_WATER_PCT) / 100;
        self.next_scan_at = (self.max * HIGH_WATER_PCT / 100).max(tracked + gap.max(1));
    }

    /// `choose` with the owners classified (`owners`, `classify`) under `cfg`: `facts` reads a
    /// process's /proc facts (`None`: gone), once per owner. The daemon's call, from whichever
    /// thread reads the table. Returns the victims and the number of selected workloads seen.
    pub fn plan(
        &self,
        cfg: &crate::config::Config,
        records: &[ConnInfo],
        mut facts: impl FnMut(u32) -> Option<std::sync::Arc<crate::policy::ProcessFacts>>,
    ) -> (Vec<Victim>, usize) {
        let mut workloads = Vec::new();
        let owners = owners(records, |tgid, port| {
            classify(cfg, port, facts(tgid).as_deref(), &mut workloads)
        });
        let victims = self.choose(records, |c| {
            owners
                .get(&(c.tgid, c.local_port))
                .copied()
                .unwrap_or(Owner::Unknown)
        });
        (victims, workloads.len())
    }

    /// The share of the table a workload may hold when `workloads` selected ones hold entries.
    pub fn share(&self, workloads: usize) -> usize {
        let by_count = self.max / (workloads.max(1) as u64);
        (self.max / MIN_SHARE_DIV).max(by_count) as usize
    }

    /// The entries to drop from `records` (the table as read; `owner` says whose each is), in
    /// the order of the module's rules, until the table is down to the low-water mark.
    pub fn choose(&self, records: &[ConnInfo], owner: impl Fn(&ConnInfo) -> Owner) -> Vec<Victim> {
        let low = (self.max * LOW_WATER_PCT / 100) as usize;
        let mut left = records.len().saturating_sub(low);
        if left == 0 {
            return Vec::new();
        }
        // Idle before in flight, then the oldest start first (never-used: 0, first of all).
        let order = |c: &&ConnInfo| (!droppable(c), c.start_ns, c.cookie);
        let mut out = Vec::new();
        let mut take = |cands: Vec<&ConnInfo>, reason: Reason, left: &mut usize| {
            for c in cands.into_iter().take(*left) {
                out.push(Victim {
                    cookie: c.cookie,
                    gen: c.gen,
                    reason,
                });
                *left -= 1;
            }
        };
        // 1. Owners no policy selects.
        let mut unselected: Vec<&ConnInfo> = records
            .iter()
            .filter(|c| owner(c) == Owner::Unselected)
            .collect();
        unselected.sort_by_key(order);
        take(unselected, Reason::Unselected, &mut left);
        // 2. Workloads over their share: the entries beyond it, idle first, oldest first.
        let mut groups: HashMap<u32, Vec<&ConnInfo>> = HashMap::new();
        for c in records {
            if let Owner::Selected(g) = owner(c) {
                groups.entry(g).or_default().push(c);
            }
        }
        let share = self.share(groups.len());
        let mut over: Vec<&ConnInfo> = Vec::new();
        for entries in groups.values_mut() {
            if entries.len() > share {
                entries.sort_by_key(order);
                over.extend(entries.iter().take(entries.len() - share));
            }
        }
        over.sort_by_key(order);
        let over_quota: std::collections::HashSet<u64> = over.iter().map(|c| c.cookie).collect();
        take(over, Reason::OverQuota, &mut left);
        // 3. The idle connections idle longest, of everyone else.
        let mut idle: Vec<&ConnInfo> = records
            .iter()
            .filter(|c| {
                droppable(c) && owner(c) != Owner::Unselected && !over_quota.contains(&c.cookie)
            })
            .collect();
        idle.sort_by_key(order);
        take(idle, Reason::Idle, &mut left);
        out
    }
}

/// Idle (no request in flight, or an upgraded connection that carries no requests).
pub fn droppable(c: &ConnInfo) -> bool {
    c.state == ReqState::Idle as u32 || c.flags & conn_flag::UPGRADED != 0
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    fn record(i: usize, busy: bool, t: u64) -> ConnInfo {
        ConnInfo {
            cookie: i as u64,
            gen: 1,
            start_ns: t,
            state: if busy {
                ReqState::InFlight as u32
            } else {
                ReqState::Idle as u32
            },
            ..ConnInfo::default()
        }
    }

    fn owner_of(k: u8) -> Owner {
        match k {
            0 => Owner::Unknown,
            1 => Owner::Unselected,
            k => Owner::Selected(u32::from(k) - 2),
        }
    }

    proptest! {
        /// With owners unknown (never used, or gone), the rule is the old one: nothing in
        /// flight is ever chosen; enough idle connections are chosen to reach the low-water
        /// mark when there are that many, the longest idle first.
        #[test]
        fn drops_the_longest_idle_and_never_a_request_in_flight(
            conns in proptest::collection::vec((any::<bool>(), 0u64..1000), 0..200),
        ) {
            let records: Vec<ConnInfo> = conns.iter().enumerate().map(|(i, (busy, t))| record(i, *busy, *t)).collect();
            let e = Evictor::new(100);
            let chosen: Vec<u64> = e.choose(&records, |_| Owner::Unknown).iter().map(|v| v.cookie).collect();
            let by = |c: u64| &records[c as usize];
            prop_assert!(chosen.iter().all(|c| by(*c).state == ReqState::Idle as u32));
            let idle = records.iter().filter(|c| droppable(c)).count();
            let want = records.len().saturating_sub(75).min(idle);
            prop_assert_eq!(chosen.len(), want);
            // Every idle connection left behind was idle for less time than every dropped one.
            let newest_dropped = chosen.iter().map(|c| by(*c).start_ns).max();
            if let Some(t) = newest_dropped {
                let kept_older = records.iter().filter(|c| droppable(c) && !chosen.contains(&c.cookie) && c.start_ns < t).count();
                prop_assert_eq!(kept_older, 0);
            }
        }

        /// Both ways, with owners: nothing is dropped below the low-water mark; nothing but an
        /// unselected owner's entry goes while one is left; a selected owner's request in flight
        /// goes only when its workload holds more than its share, and never below that share;
        /// and when fewer than needed were chosen, nothing droppable was left behind.
        #[test]
        fn unselected_first_then_quotas_and_never_a_fair_request_in_flight(
            max in 16u32..200,
            conns in proptest::collection::vec((0u8..7, any::<bool>(), 0u64..1000), 0..260),
        ) {
            let records: Vec<ConnInfo> = conns.iter().enumerate().map(|(i, (_, busy, t))| record(i, *busy, *t)).collect();
            let owner = |c: &ConnInfo| owner_of(conns[c.cookie as usize].0);
            let e = Evictor::new(max);
            let low = (u64::from(max) * LOW_WATER_PCT / 100) as usize;
            let excess = records.len().saturating_sub(low);
            let victims = e.choose(&records, owner);
            let chosen: HashSet<u64> = victims.iter().map(|v| v.cookie).collect();
            prop_assert_eq!(chosen.len(), victims.len(), "an entry chosen twice");
            prop_assert!(victims.len() <= excess, "below the low-water mark");
            let mut count: HashMap<u32, usize> = HashMap::new();
            for c in &records {
                if let Owner::Selected(g) = owner(c) { *count.entry(g).or_default() += 1; }
            }
            let share = e.share(count.len());
            let unselected_left = records.iter().any(|c| owner(c) == Owner::Unselected && !chosen.contains(&c.cookie));
            for v in &victims {
                let c = &records[v.cookie as usize];
                prop_assert_eq!(v.gen, c.gen);
                match owner(c) {
                    Owner::Unselected => prop_assert_eq!(v.reason, Reason::Unselected),
                    o => {
                        prop_assert!(!unselected_left, "{:?} dropped while an unselected entry is left", o);
                        if !droppable(c) {
                            let Owner::Selected(g) = o else {
                                return Err(TestCaseError::fail("an unknown owner's request in flight dropped"));
                            };
                            prop_assert_eq!(v.reason, Reason::OverQuota);
                            prop_assert!(count[&g] > share, "workload {} within its share lost a request in flight", g);
                        }
                    }
                }
            }
            // No over-quota workload is cut below its share.
            for (g, n) in &count {
                let dropped = victims.iter().filter(|v| v.reason == Reason::OverQuota && owner(&records[v.cookie as usize]) == Owner::Selected(*g)).count();
                prop_assert!(dropped <= n.saturating_sub(share));
            }
            if victims.len() < excess {
                prop_assert!(!unselected_left);
                prop_assert!(records.iter().all(|c| !droppable(c) || chosen.contains(&c.cookie)), "an idle entry left behind");
                for (g, n) in &count {
                    let kept = n - records.iter().filter(|c| owner(c) == Owner::Selected(*g) && chosen.contains(&c.cookie)).count();
                    prop_assert!(kept <= share, "workload {} keeps {} > {}", g, kept, share);
                }
            }
        }
    }

    #[test]
    fn a_flood_by_an_unselected_owner_gives_way_before_anyone_else() {
        let e = Evictor::new(64);
        // 60 in flight by an unselected process, 4 in flight by a selected server.
        let records: Vec<ConnInfo> = (0..64).map(|i| record(i, true, i as u64)).collect();
        let owner = |c: &ConnInfo| {
            if c.cookie < 60 {
                Owner::Unselected
            } else {
                Owner::Selected(0)
            }
        };
        let v = e.choose(&records, owner);
        assert_eq!(v.len(), 64 - 48);
        assert!(v
            .iter()
            .all(|v| v.cookie < 60 && v.reason == Reason::Unselected));
        // The oldest first.
        assert_eq!(v[0].cookie, 0);
        // One tenant holding 60 of a 64-entry table beside three others: it keeps its share.
        let owner = |c: &ConnInfo| {
            Owner::Selected(if c.cookie < 58 {
                0
            } else {
                c.cookie as u32 % 3 + 1
            })
        };
        let v = e.choose(&records, owner);
        assert_eq!(e.share(4), 16);
        assert_eq!(v.len(), 16);
        assert!(v
            .iter()
            .all(|v| v.cookie < 58 && v.reason == Reason::OverQuota));
    }

    #[test]
    fn a_victim_is_deleted_only_while_it_is_the_same_request() {
        let idle = record(7, false, 1);
        let v = Victim {
            cookie: 7,
            gen: 1,
            reason: Reason::Idle,
        };
        assert!(still_same(&v, &idle));
        // A request started since: the generation moved.
        let started = ConnInfo {
            gen: 2,
            ..record(7, true, 2)
        };
        assert!(!still_same(&v, &started));
        let flood = Victim {
            reason: Reason::Unselected,
            ..v
        };
        assert!(still_same(&flood, &record(7, true, 1)));
        assert!(!still_same(&flood, &started));
    }

    #[test]
    fn owners_are_classified_once_per_process_and_port() {
        let mut records: Vec<ConnInfo> = (0..6).map(|i| record(i, true, 0)).collect();
        for (i, c) in records.iter_mut().enumerate() {
            c.tgid = [0, 10, 10, 11, 11, 11][i];
            c.local_port = [80, 80, 80, 80, 81, 81][i];
        }
        let mut asked = Vec::new();
        let o = owners(&records, |tgid, port| {
            asked.push((tgid, port));
            if tgid == 10 {
                Owner::Unselected
            } else {
                Owner::Selected(0)
            }
        });
        assert_eq!(asked, vec![(10, 80), (11, 80), (11, 81)]);
        assert_eq!(o[&(0, 80)], Owner::Unknown);
        assert_eq!(o[&(10, 80)], Owner::Unselected);
    }

    #[test]
    fn scans_at_the_high_water_mark_then_waits_for_the_gap() {
        let mut e = Evictor::new(1000);
        assert!(!e.due(899));
        assert!(e.due(900));
        e.scanned(950);
        assert!(!e.due(1000));
        assert!(e.due(1100));
    }
}
