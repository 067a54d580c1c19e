//! Idle connections give way: when the connection table passes its high-water mark, the
//! connections idle longest are dropped from tracking (their `CONNS` record deleted) so that a
//! client holding many idle connections cannot leave every later connection untracked. Pure:
//! the daemon reads the table, asks `choose`, re-reads each chosen record and deletes it only
//! if it is still idle.
//!
//! A connection with a request in flight is never chosen. Dropping is fail-open: a dropped
//! connection's later requests are simply not followed (never acted on), and the kernel counts
//! nothing for them.

use watchdog_common::{conn_flag, ConnInfo, ReqState};

/// Start dropping at this share of the table, in percent...
pub const HIGH_WATER_PCT: u64 = 90;
/// ...down to this share.
pub const LOW_WATER_PCT: u64 = 75;

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

    /// The cookies to drop from `records` (the table as read): idle ones, longest idle first
    /// (the oldest request start; never-used connections first of all), until the table is
    /// down to the low-water mark.
    pub fn choose(&self, records: &[ConnInfo]) -> Vec<u64> {
        let low = (self.max * LOW_WATER_PCT / 100) as usize;
        let excess = records.len().saturating_sub(low);
        let mut idle: Vec<&ConnInfo> = records.iter().filter(|c| droppable(c)).collect();
        idle.sort_by_key(|c| c.start_ns);
        idle.iter().take(excess).map(|c| c.cookie).collect()
    }
}

/// Idle (no request in flight, or an upgraded connection that carries no requests).
pub fn droppable(c: &ConnInfo) -> bool {
    c.state == ReqState::Idle as u32 || c.flags & conn_flag::UPGRADED != 0
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Both directions: nothing in flight is ever chosen; enough idle connections are chosen
        /// to reach the low-water mark when there are that many, the longest idle first.
        #[test]
        fn drops_the_longest_idle_and_never_a_request_in_flight(
            conns in proptest::collection::vec((any::<bool>(), 0u64..1000), 0..200),
        ) {
            let records: Vec<ConnInfo> = conns.iter().enumerate().map(|(i, (busy, t))| ConnInfo {
                cookie: i as u64,
                start_ns: *t,
                state: if *busy { ReqState::InFlight as u32 } else { ReqState::Idle as u32 },
                ..ConnInfo::default()
            }).collect();
            let e = Evictor::new(100);
            let chosen = e.choose(&records);
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
