//! Map values shared by the kernel programs and the daemon.

use core::mem::size_of;

use crate::head::HEAD_BYTES;

/// A watched port (or, at index 0, every port): what the kernel needs at accept and request start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortConfig {
    /// When the kernel timer fires after a request starts, in nanoseconds. The earliest step of
    /// any policy on this port; userspace schedules later steps itself.
    pub deadline_ns: u64,
    /// Metrics slot (`0..MAX_PORT_SLOTS`).
    pub slot: u32,
    /// `PORT_WATCHED` | `PORT_CLIENT_GONE` | `PORT_ROUTES` | `PORT_NO_UPGRADES`.
    pub flags: u32,
    /// When an HTTP/2 stream's timer fires after it starts: the earliest budget of the port's
    /// routes and policies (the daemon finds the stream's route and times the rest).
    pub stream_deadline_ns: u64,
}

/// Connections on this port are tracked.
pub const PORT_WATCHED: u32 = 1;
/// Report a peer FIN/RST that arrives while a request is in flight.
pub const PORT_CLIENT_GONE: u32 = 2;
/// The port has routes: look an HTTP/1.x request's method and path up in `ROUTES`.
pub const PORT_ROUTES: u32 = 4;
/// Every policy of the port says `upgrades = false`: answers are not read for a `101`.
pub const PORT_NO_UPGRADES: u32 = 8;

/// Request state of a tracked connection.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqState {
    /// No request in flight (between requests, or before the first one).
    Idle = 0,
    /// Bytes came in, no byte has gone out yet.
    InFlight = 1,
}

/// What userspace may read about a tracked connection and its current request.
///
/// Addresses are IPv6 (IPv4 as `::ffff:a.b.c.d`), network byte order; ports host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    /// Socket cookie: the connection's identity for its whole life.
    pub cookie: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the current request started.
    pub start_ns: u64,
    /// Identity of the owning task's life (see `TaskInfo::life`).
    pub owner_life: u64,
    /// Deadline the kernel timer was armed with, relative to `start_ns`.
    pub deadline_ns: u64,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Request generation on this connection: 1 for the first request, then +1 each.
    pub gen: u32,
    /// `ReqState` as u32.
    pub state: u32,
    /// Owner thread id (kernel pid) and process id (kernel tgid).
    pub tid: u32,
    pub tgid: u32,
    pub local_port: u16,
    pub remote_port: u16,
    /// Metrics slot of the port.
    pub slot: u16,
    /// Address family (AF_INET = 2, AF_INET6 = 10).
    pub family: u16,
    /// `conn_flag` bits about the connection and its current request's deadline.
    pub flags: u32,
    /// `head::proto` of the connection (decided at its first request).
    pub proto: u8,
    /// `head::head_state` of the current request.
    pub head_state: u8,
    /// Bytes of `ConnRecord::head` / `Event::head` that belong to the current request.
    pub head_len: u16,
    /// `bpf_ktime_get_ns` of the last read of the current request's connection while its head
    /// was incomplete (`conn_flag::HEAD_PENDING`); its first byte's time otherwise. Not kept
    /// for later reads (a body's): that would cost every read of a tracked connection.
    pub last_rx_ns: u64,
}

/// `ConnInfo::flags`. `UNARMED` and `EVENT_LOST`: the kernel's deadline path failed for the
/// current request and userspace's backstop sweep (`backstop.rs`) must enforce it instead.
/// Cleared when the next request starts.
pub mod conn_flag {
    /// The deadline timer could not be armed (`bpf_timer_init` allocates without sleeping and
    /// fails with ENOMEM under a burst of set-ups: about 9 % of them during a ramp to 50,000
    /// connections here, with gigabytes free and no memory-cgroup limit).
    pub const UNARMED: u32 = 1;
    /// The timer fired on a request in flight but the ring buffer was full: the event was lost.
    pub const EVENT_LOST: u32 = 2;
    /// The current request's route has `budget = "off"` in every policy that may apply: no
    /// timer, no client-gone event, no backstop.
    pub const NO_DEADLINE: u32 = 4;
    /// The server answered `101 Switching Protocols`: the connection carries messages, not
    /// requests, and is no longer tracked for requests. Never cleared.
    pub const UPGRADED: u32 = 8;
    /// An event about one HTTP/2 stream: `ConnInfo::gen` is the stream id, `start_ns`, the
    /// owner and the deadline are the stream's, and the event's head is its header block.
    pub const STREAM: u32 = 16;
    /// The kernel lost track of this HTTP/2 connection's frames: no more streams are started,
    /// and those in flight are dropped when their timer fires.
    pub const H2_LOST: u32 = 32;
    /// HTTP/1.x: the current request's head has not been read whole yet (no blank line among
    /// the bytes received so far). Its time is the client's: the kernel restarts the request's
    /// clock (`start_ns`) when the blank line arrives, and userspace never acts on the worker
    /// while this is set (`blame.rs`).
    pub const HEAD_PENDING: u32 = 64;
    /// The connection was open before its port was watched and was taken into tracking by the
    /// daemon's socket iterator, not at accept: no request of it has started since (cleared by
    /// its first request, like every flag but `UPGRADED`).
    pub const ADOPTED: u32 = 128;
}

/// `STREAMS` key: one HTTP/2 stream of a tracked connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub cookie: u64,
    pub id: u32,
    pub _pad: u32,
}

/// `StreamInfo::flags`.
pub mod stream_flag {
    /// The deadline event was written; the timer now only checks that the connection lives.
    pub const REPORTED: u32 = 1;
    /// The client reset the stream (RST_STREAM) while it was in flight.
    pub const CLIENT_GONE: u32 = 2;
    /// The timer could not be armed: the stream has no deadline in the kernel.
    pub const UNARMED: u32 = 4;
}

/// What the kernel keeps about one HTTP/2 stream in flight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamInfo {
    /// When its HEADERS frame was read.
    pub start_ns: u64,
    /// Life stamp of the thread that read it (`TaskInfo::life`).
    pub owner_life: u64,
    /// Its deadline, relative to `start_ns`: its route's, or the port's.
    pub deadline_ns: u64,
    pub tid: u32,
    pub tgid: u32,
    /// `stream_flag` bits.
    pub flags: u32,
    /// Metrics slot of its route, or of the port.
    pub slot: u16,
    /// `head::head_state` of its header block.
    pub head_state: u8,
    pub _pad: u8,
    /// Bytes of `StreamRecord::head` copied.
    pub head_len: u16,
    pub _pad2: [u8; 6],
}

/// The `STREAMS` value: the stream's own deadline timer, what is known of it, and the first
/// bytes of its header block (HPACK).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StreamRecord {
    /// Kernel-owned timer; reads as zero from userspace.
    pub timer: [u64; 2],
    pub info: StreamInfo,
    pub head: [u8; HEAD_BYTES],
}

/// The `CONNS` value: an opaque `struct bpf_timer` first, then the readable part.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnRecord {
    /// Kernel-owned timer; reads as zero from userspace.
    pub timer: [u64; 2],
    pub info: ConnInfo,
    /// Kernel-owned: the `bpf_ktime_get_ns` time the timer was last armed to fire at (or after),
    /// 0 before the first request; its high bit is set once the callback has begun for that
    /// moment. A request starting while the timer is armed for an earlier moment, not yet
    /// fired, leaves it alone: the callback re-arms for the request then in flight.
    pub armed_ns: u64,
    /// Kernel-owned sequence of the request fields (seqlock): odd while a request start writes
    /// `info` and `head`, even once they are published. The timer callback trusts a copy only if
    /// it read the same even value before and after it.
    pub seq: u64,
    /// The current request's first bytes (`info.head_len` of them), copied at its start.
    pub head: [u8; HEAD_BYTES],
}

impl Default for ConnRecord {
    fn default() -> Self {
        Self {
            timer: [0; 2],
            info: ConnInfo::default(),
            armed_ns: 0,
            seq: 0,
            head: [0; HEAD_BYTES],
        }
    }
}

/// A live task that owned a request. Deleted when the task exits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskInfo {
    /// `bpf_ktime_get_ns` when this task was first seen: with the tid, names one task's life,
    /// so a reused tid never matches a request recorded for an earlier task.
    pub life: u64,
    /// The request this task started most recently.
    pub cur_cookie: u64,
    pub cur_gen: u32,
    pub _pad: u32,
}

/// Stamp of a pinned kernel state (`META[0]`), written last when the daemon pins a fresh state.
/// A restarted daemon adopts the pinned programs and maps only if every field equals its own;
/// otherwise it never reads them, and replaces them. `layout_version` must stay the first field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// `LAYOUT_VERSION` of the daemon that pinned the state.
    pub layout_version: u32,
    /// `probes::SOCK` or `probes::SYSCALLS`.
    pub probe_set: u32,
    /// FNV-1a hash of the eBPF object: other programs, other state.
    pub object_hash: u64,
    /// `max_entries` of the connection tables.
    pub max_conns: u32,
    /// Size of the event ring buffer in bytes.
    pub events_bytes: u32,
}

const _: () = assert!(size_of::<Meta>() == 24);
const _: () = assert!(size_of::<PortConfig>() == 24);
const _: () = assert!(size_of::<ConnInfo>() == 104);
const _: () = assert!(size_of::<ConnRecord>() == 136 + HEAD_BYTES);
const _: () = assert!(size_of::<TaskInfo>() == 24);
const _: () = assert!(size_of::<StreamKey>() == 16);
const _: () = assert!(size_of::<StreamInfo>() == 48);
const _: () = assert!(size_of::<StreamRecord>() == 64 + HEAD_BYTES);

#[cfg(feature = "user")]
mod user {
    // SAFETY (each): plain #[repr(C)] integers and arrays, no padding (the size asserts check
    // it), every bit pattern valid.
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TaskInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Meta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StreamKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StreamRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::head::RouteValue {}
}
