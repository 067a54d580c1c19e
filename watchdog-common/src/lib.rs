//! Types shared by the watchdog kernel programs (`watchdog-ebpf`) and the daemon (`watchdog`).
//!
//! Everything here is `#[repr(C)]`, has no `bool` and no implicit padding, and is checked for size
//! at compile time: the kernel and the daemon read the same bytes. The `user` feature adds the
//! `aya::Pod` impls the daemon needs.
#![no_std]

pub mod event;
pub mod h2;
pub mod head;
pub mod names;
pub mod probes;
pub mod state;

pub use event::{Event, EventKind};
pub use state::{
    conn_flag, stream_flag, ConnInfo, ConnRecord, Meta, PortConfig, ReqState, StreamInfo,
    StreamKey, StreamRecord, TaskInfo, PORT_CLIENT_GONE, PORT_NO_UPGRADES, PORT_ROUTES,
    PORT_WATCHED,
};

/// Bumped whenever the layout of any map key or value changes. Stamped into the `META` map so a
/// daemon never reads pinned state written with another layout.
pub const LAYOUT_VERSION: u32 = 10;

/// Capacity limits of the kernel tables. Fixed at build time; insert failures are counted.
pub mod limits {
    /// Connections tracked at once (accepted on a watched port, not yet closed).
    pub const MAX_CONNS: u32 = 65_536;
    /// Threads that own or owned a request and are still alive.
    pub const MAX_TASKS: u32 = 65_536;
    /// Distinct watched ports that get their own metrics slot. Slot 0 collects the rest.
    pub const MAX_PORT_SLOTS: u32 = 64;
    /// Routes (over all policies) that get their own metrics slot, after the port slots.
    pub const MAX_ROUTES: u32 = 128;
    /// Metrics slots in all: ports first, then routes.
    pub const MAX_STAT_SLOTS: u32 = MAX_PORT_SLOTS + MAX_ROUTES;
    /// HTTP/2 streams in flight at once, over all connections (`STREAMS`).
    pub const MAX_STREAMS: u32 = 16_384;
    /// Entries of the kernel's route table: one per (port, method, pattern); a route without a
    /// method takes one entry per method.
    pub const ROUTE_ENTRIES: u32 = 16_384;
    /// Ring buffer for rare events (deadlines, client gone), in bytes.
    pub const EVENTS_BYTES: u32 = 256 * 1024;
    /// Every port number is an index into the ports array; index 0 is the wildcard entry.
    pub const PORTS: u32 = 65_536;
}

/// Request-duration histogram kept in the kernel, per metrics slot: upper bounds in
/// milliseconds. One more bucket (`+Inf`) follows the last bound.
pub const DURATION_BUCKETS_MS: [u64; 17] = [
    1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000,
    600_000,
];

/// Per-slot counters in the `PORT_STATS` per-CPU array: `slot * PORT_STAT_STRIDE + index`.
pub mod port_stat {
    /// Histogram buckets (non-cumulative) occupy indexes `0..=DURATION_BUCKETS_MS.len()`.
    pub const BUCKETS: u32 = 0;
    /// Sum of time-to-first-byte durations, in nanoseconds.
    pub const DURATION_SUM_NS: u32 = super::DURATION_BUCKETS_MS.len() as u32 + 1;
    /// Requests started.
    pub const STARTED: u32 = DURATION_SUM_NS + 1;
    /// Requests that ended without a response because the connection closed.
    pub const CLOSED_IN_FLIGHT: u32 = STARTED + 1;
    /// Connections by protocol (port slots only): `PROTO + head::proto::*`.
    pub const PROTO: u32 = CLOSED_IN_FLIGHT + 1;
    /// Connections upgraded (`101 Switching Protocols`) and no longer tracked for requests.
    pub const UPGRADED: u32 = PROTO + crate::head::proto::COUNT as u32;
    /// Requests on a port with routes whose bytes could not be read: policy budget, route unknown.
    pub const ROUTE_UNREADABLE: u32 = UPGRADED + 1;
    /// Requests on a port with routes whose request line ended before its path: the same.
    pub const ROUTE_SPLIT: u32 = ROUTE_UNREADABLE + 1;
    /// HTTP/2 streams on a port with routes whose `:path` is a dynamic-table index (sent on
    /// an earlier stream): policy budget, route unknown.
    pub const ROUTE_HPACK_INDEXED: u32 = ROUTE_SPLIT + 1;
    /// HTTP/2 streams on a port with routes whose `:path` is Huffman-coded: the same.
    pub const ROUTE_HPACK_HUFFMAN: u32 = ROUTE_HPACK_INDEXED + 1;
    /// HTTP/1.x requests whose first read held no whole head (no blank line): their clock
    /// waits for it (`conn_flag::HEAD_PENDING`).
    pub const HEAD_PENDING: u32 = ROUTE_HPACK_HUFFMAN + 1;
    /// Of those, heads completed by a later read: the request's clock restarted then.
    pub const HEAD_COMPLETED: u32 = HEAD_PENDING + 1;
    /// HTTP/1.x interim answers (`1xx` other than `101`) sent: the request goes on.
    pub const INTERIM: u32 = HEAD_COMPLETED + 1;
    /// Established connections taken into tracking by the daemon's socket iterator
    /// (`programs/adopt.rs`), not at accept: they were open before the port was watched.
    pub const ADOPTED: u32 = INTERIM + 1;
    /// Entries per slot.
    pub const STRIDE: u32 = ADOPTED + 1;
}

/// Global counters in the `STATS` per-CPU array.
pub mod stat {
    /// Connections accepted on a watched port and tracked.
    pub const CONNS_OPENED: u32 = 0;
    /// Tracked connections closed.
    pub const CONNS_CLOSED: u32 = 1;
    /// Connections not tracked because the connection table was full.
    pub const CONNS_TABLE_FULL: u32 = 2;
    /// Requests not given an owner because the task table was full.
    pub const TASKS_TABLE_FULL: u32 = 3;
    /// Events dropped because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 4;
    /// Deadline timers that fired on a request still in flight.
    pub const DEADLINES_FIRED: u32 = 5;
    /// Deadline timers that fired on a request that had already ended (no work done).
    pub const DEADLINES_STALE: u32 = 6;
    /// Tasks dropped from the task table on exit.
    pub const TASKS_EXITED: u32 = 7;
    /// `bpf_timer_init` / `_set_callback` calls that failed at accept.
    pub const TIMER_INIT_ERRORS: u32 = 8;
    /// `bpf_timer_start` calls that failed (a request without a timer).
    pub const TIMER_START_ERRORS: u32 = 9;
    /// Deadline timers that fired early for the request in flight (armed for an earlier request
    /// on the connection) and were moved to that request's deadline.
    pub const DEADLINES_REARMED: u32 = 10;
    /// HTTP/2 streams not tracked because the stream table was full.
    pub const STREAMS_TABLE_FULL: u32 = 11;
    /// HTTP/2 connections whose frames the kernel lost track of (a write it cannot read, a
    /// read with more frames than one walk follows): their streams are no longer tracked.
    pub const H2_LOST: u32 = 12;
    /// HTTP/2 streams started (HEADERS in) on tracked connections.
    pub const STREAMS_STARTED: u32 = 13;
    /// HTTP/2 streams that ended: answered (HEADERS out) or reset (RST_STREAM either way).
    pub const STREAMS_ENDED: u32 = 14;
    /// Stream entries of closed connections dropped by their own timer.
    pub const STREAMS_REAPED: u32 = 15;
    /// Processes not added to `OWNERS` (syscall set) because it was full: their tracked
    /// connections are not seen.
    pub const OWNERS_TABLE_FULL: u32 = 16;
    /// Connections not tracked because `SOCK_STATES` (syscall set) or socket storage refused
    /// their state.
    pub const SOCK_STATES_TABLE_FULL: u32 = 17;
    /// Threads dropped from the task table because they called `execve` as a non-leader: their
    /// tid is gone without `sched_process_exit`.
    pub const TASKS_EXECED: u32 = 18;
    /// Request starts that found another start still writing the connection's record (not
    /// tracked; counted so it is never silent).
    pub const STARTS_CONTENDED: u32 = 19;
    /// Timer callbacks that found a request start writing the record: that start arms the
    /// timer itself.
    pub const DEADLINES_RACED: u32 = 20;
    /// HTTP/2 streams refused because their port already had its share of `STREAMS`.
    pub const STREAMS_PORT_FULL: u32 = 21;
    /// Connections adopted by the socket iterator (also counted in `CONNS_OPENED`).
    pub const CONNS_ADOPTED: u32 = 22;
    /// Number of counters.
    pub const COUNT: u32 = 23;
}
