//! The kernel's counters as userspace reads them: global books and per-slot request counts and
//! histograms, summed over CPUs at scrape time.

use aya::maps::{MapData, PerCpuArray};
use watchdog_common::{head::proto, port_stat, stat};

use super::{KernelStats, SlotStats};

/// The kernel's per-CPU counters (read-only from userspace).
pub struct Counters {
    pub(super) stats: PerCpuArray<MapData, u64>,
    pub(super) port_stats: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counters")
    }
}

impl Counters {
    /// Timer-start errors, lost events and requests the task table had no room for (flagged
    /// `UNARMED`): the failures `backstop.rs` covers. Three reads.
    pub fn backstop_failures(&self) -> u64 {
        [
            stat::TIMER_START_ERRORS,
            stat::EVENTS_LOST,
            stat::TASKS_TABLE_FULL,
        ]
        .iter()
        .map(|i| {
            self.stats
                .get(i, 0)
                .map(|v| v.iter().copied().sum())
                .unwrap_or(0)
        })
        .sum()
    }

    /// Tracked connections still open (`CONNS_OPENED - CONNS_CLOSED`): two reads, for the
    /// event loop's 100 ms poll (`stats` reads every counter).
    pub fn tracked(&self) -> u64 {
        let get = |i: u32| -> u64 {
            self.stats
                .get(&i, 0)
                .map(|v| v.iter().copied().sum())
                .unwrap_or(0)
        };
        get(stat::CONNS_OPENED).saturating_sub(get(stat::CONNS_CLOSED))
    }

    pub fn stats(&self) -> KernelStats {
        let get = |i: u32| -> u64 {
            self.stats
                .get(&i, 0)
                .map(|v| v.iter().copied().sum())
                .unwrap_or(0)
        };
        KernelStats {
            conns_opened: get(stat::CONNS_OPENED),
            conns_closed: get(stat::CONNS_CLOSED),
            conns_table_full: get(stat::CONNS_TABLE_FULL),
            tasks_table_full: get(stat::TASKS_TABLE_FULL),
            events_lost: get(stat::EVENTS_LOST),
            deadlines_fired: get(stat::DEADLINES_FIRED),
            deadlines_stale: get(stat::DEADLINES_STALE),
            tasks_exited: get(stat::TASKS_EXITED),
            timer_init_errors: get(stat::TIMER_INIT_ERRORS),
            timer_start_errors: get(stat::TIMER_START_ERRORS),
            deadlines_rearmed: get(stat::DEADLINES_REARMED),
            streams_started: get(stat::STREAMS_STARTED),
            streams_ended: get(stat::STREAMS_ENDED),
            streams_reaped: get(stat::STREAMS_REAPED),
            streams_table_full: get(stat::STREAMS_TABLE_FULL),
            h2_lost: get(stat::H2_LOST),
            owners_table_full: get(stat::OWNERS_TABLE_FULL),
            sock_states_table_full: get(stat::SOCK_STATES_TABLE_FULL),
            tasks_execed: get(stat::TASKS_EXECED),
            starts_contended: get(stat::STARTS_CONTENDED),
            deadlines_raced: get(stat::DEADLINES_RACED),
            streams_port_full: get(stat::STREAMS_PORT_FULL),
            conns_adopted: get(stat::CONNS_ADOPTED),
        }
    }

    /// Counters of one metrics slot.
    pub fn slot_stats(&self, slot: u32) -> SlotStats {
        let base = slot * port_stat::STRIDE;
        let get = |i: u32| -> u64 {
            self.port_stats
                .get(&(base + i), 0)
                .map(|v| v.iter().copied().sum())
                .unwrap_or(0)
        };
        SlotStats {
            buckets: (0..=watchdog_common::DURATION_BUCKETS_MS.len() as u32)
                .map(|b| get(port_stat::BUCKETS + b))
                .collect(),
            duration_sum_ns: get(port_stat::DURATION_SUM_NS),
            started: get(port_stat::STARTED),
            closed_in_flight: get(port_stat::CLOSED_IN_FLIGHT),
            protocols: (0..u32::from(proto::COUNT))
                .map(|p| get(port_stat::PROTO + p))
                .collect(),
            upgraded: get(port_stat::UPGRADED),
            adopted: get(port_stat::ADOPTED),
            route_unreadable: get(port_stat::ROUTE_UNREADABLE),
            route_split: get(port_stat::ROUTE_SPLIT),
        }
    }
}
