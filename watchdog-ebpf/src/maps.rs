//! Maps shared by the programs, and the small helpers that touch them.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{bpf_timer, BPF_NOEXIST},
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, SkStorage},
    helpers::bpf_sk_storage_get,
    macros::btf_map,
};
use watchdog_common::{
    head::{RouteValue, ROUTE_KEY_DATA},
    limits::{
        EVENTS_BYTES, MAX_CONNS, MAX_STAT_SLOTS, MAX_STREAMS, MAX_TASKS, PORTS as PORT_ENTRIES,
        ROUTE_ENTRIES,
    },
    port_stat,
    probes::{self, KernelOffsets},
    stat, ConnInfo, ConnRecord, Event, EventKind, Meta, PortConfig, StreamInfo, StreamKey,
    StreamRecord, TaskInfo, LAYOUT_VERSION,
};

use crate::programs::head::RouteKey;

/// Which probe set the daemon chose (`probes::SOCK` or `probes::SYSCALLS`). Read-only, set at
/// load time: the verifier treats it as a constant and prunes the other set's branches.
#[unsafe(no_mangle)]
static PROBE_SET: u32 = probes::SOCK;

/// Struct offsets of the running kernel, for the syscall set (see `KernelOffsets`).
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    task_files: 0,
    task_tgid: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
    sock_socket: 0,
    sock_cookie: 0,
    _pad: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_family: 0,
    skc_state: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
};

/// Is the syscall probe set in use (per-socket state in `SOCK_STATES`, not `SOCKS`)?
#[inline(always)]
pub fn syscall_set() -> bool {
    // SAFETY: a read-only global of this object.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(PROBE_SET)) == probes::SYSCALLS }
}

/// The kernel struct offsets the daemon wrote at load time.
#[inline(always)]
pub fn offsets() -> KernelOffsets {
    // SAFETY: a read-only global of this object.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(OFFSETS)) }
}

/// Per-socket state kept in socket-local storage: freed by the kernel with the socket.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockState {
    pub cookie: u64,
    /// Current request generation.
    pub gen: u32,
    /// `ReqState` as u32.
    pub state: u32,
    /// Metrics slot of the local port.
    pub slot: u32,
    /// `SOCK_PEER_FIN`, `SOCK_UPGRADED`.
    pub flags: u32,
    /// Metrics slot of the current request: its route's, or the port's.
    pub stat_slot: u32,
    /// `head::proto` of the connection, decided at its first request.
    pub proto: u32,
    /// HTTP/2 frame walk state of the bytes coming in and going out (`programs/h2.rs`).
    pub h2_rx: H2Dir,
    pub h2_tx: H2Dir,
    /// HTTP/1.x head scan (`SOCK_HEAD_PENDING`): the last three bytes received, low byte last.
    pub head_tail: u32,
    pub _pad: u32,
}

/// Where one direction of an HTTP/2 connection's byte stream stands between two calls.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct H2Dir {
    /// Payload bytes of the current frame still to come.
    pub skip: u32,
    /// Bytes of the next frame header already seen (in `acc`, big-endian).
    pub hlen: u32,
    pub acc: u64,
}

impl H2Dir {
    /// At a frame boundary.
    pub const START: Self = Self {
        skip: 0,
        hlen: 0,
        acc: 0,
    };
}

/// `CONNS` value. Same layout as `watchdog_common::ConnRecord`; the timer must be a field of
/// BTF type `struct bpf_timer` for the verifier to accept it.
#[repr(C)]
pub struct ConnEntry {
    pub timer: bpf_timer,
    pub info: ConnInfo,
    /// See `ConnRecord::armed_ns`. Changed only with the fully ordered atomics below.
    pub armed_ns: u64,
    /// See `ConnRecord::seq`. Changed only with the fully ordered atomics below.
    pub seq: u64,
    /// See `ConnRecord::head`.
    pub head: [u8; watchdog_common::head::HEAD_BYTES],
}

const _: () = assert!(
    core::mem::size_of::<ConnEntry>() == core::mem::size_of::<watchdog_common::ConnRecord>()
);

/// The high bit of `ConnEntry::armed_ns`: the timer's callback has begun since the timer was
/// armed for that moment. The callback sets it with `fetch_or` before it reads the record; whoever
/// arms the timer next stores the new time first (`xchg`), which clears it (`request::arm_for`).
pub const ARMED_FIRED: u64 = 1 << 63;

// The hand-off between a request start, its end and the timer callback uses only the BPF
// atomics with `BPF_FETCH` (fetch_add, fetch_or, xchg, cmpxchg). The kernel's memory model
// (Documentation/bpf/standardization, tools/memory-model) makes every one of them fully
// ordered, like `smp_mb()` on both sides: every JIT emits them so (x86-64 `lock xadd` /
// `lock cmpxchg` / `xchg`, arm64 LSE `*al` forms or LL/SC loops with `dmb ish`, and so on). The
// add without fetch (`lock *(u64 *)(p) += v`) is unordered on weakly ordered JITs (arm64
// `stadd`): it is used for nothing here. Written as assembly: the BPF target's `core` has no
// compare-and-swap (`atomic-cas: false` in its target spec).

/// `*p += v`, returning the old value; fully ordered.
///
/// # Safety
/// `p` points at an aligned u64 in a map value.
#[inline(always)]
pub unsafe fn fetch_add(p: *mut u64, v: u64) -> u64 {
    let mut r = v;
    // SAFETY: `p` is an aligned u64 in a map value (the caller's contract), live for the
    // program's run; the instruction reads and writes only that word.
    unsafe {
        core::arch::asm!(
            "{r} = atomic_fetch_add((u64 *)({p} + 0), {r})",
            p = in(reg) p,
            r = inout(reg) r,
            options(nostack),
        )
    };
    r
}

/// `*p |= v`, returning the old value; fully ordered.
///
/// # Safety
/// As `fetch_add`.
#[inline(always)]
pub unsafe fn fetch_or(p: *mut u64, v: u64) -> u64 {
    let mut r = v;
    // SAFETY: as in `fetch_add`.
    unsafe {
        core::arch::asm!(
            "{r} = atomic_fetch_or((u64 *)({p} + 0), {r})",
            p = in(reg) p,
            r = inout(reg) r,
            options(nostack),
        )
    };
    r
}

/// `*p &= v`, returning the old value; fully ordered.
///
/// # Safety
/// As `fetch_add`.
#[inline(always)]
pub unsafe fn fetch_and(p: *mut u64, v: u64) -> u64 {
    let mut r = v;
    // SAFETY: as in `fetch_add`.
    unsafe {
        core::arch::asm!(
            "{r} = atomic_fetch_and((u64 *)({p} + 0), {r})",
            p = in(reg) p,
            r = inout(reg) r,
            options(nostack),
        )
    };
    r
}

/// `*p = v`, returning the old value; fully ordered.
///
/// # Safety
/// As `fetch_add`.
#[inline(always)]
pub unsafe fn xchg(p: *mut u64, v: u64) -> u64 {
    let mut r = v;
    // SAFETY: as in `fetch_add`.
    unsafe {
        core::arch::asm!(
            "{r} = xchg_64({p} + 0, {r})",
            p = in(reg) p,
            r = inout(reg) r,
            options(nostack),
        )
    };
    r
}

/// If `*p == old`, `*p = new`; returns what `*p` held (equal to `old` when it swapped). Fully
/// ordered whether or not it swapped.
///
/// # Safety
/// As `fetch_add`.
#[inline(always)]
pub unsafe fn cmpxchg(p: *mut u64, old: u64, new: u64) -> u64 {
    let seen: u64;
    // SAFETY: as in `fetch_add`; the instruction takes the expected value in r0 and leaves the
    // word's old value there.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({p} + 0, r0, {n})",
            p = in(reg) p,
            n = in(reg) new,
            inout("r0") old => seen,
            options(nostack),
        )
    };
    seen
}

/// A request generation and its `ReqState`, as the one aligned u64 they form in `SockState`
/// (`gen`, `state`) and in `ConnInfo` (`gen`, `state`): little-endian, `gen` the low half.
#[inline(always)]
pub const fn gen_state(gen: u32, state: u32) -> u64 {
    (gen as u64) | ((state as u64) << 32)
}

/// Moves a `gen_state` word forward to `to`, never back: to a later generation, or from in
/// flight to idle within one. At most three compare-and-swaps (the word has at most two other
/// writers at a time, each moving it forward); false if the word already was at or past `to`.
///
/// # Safety
/// `p` points at an aligned `gen_state` word in a map value or socket storage.
#[inline(always)]
pub unsafe fn advance(p: *mut u64, to: u64) -> bool {
    // SAFETY: the caller's contract; a plain read is only a guess the swap checks.
    let mut old = unsafe { ptr::read_volatile(p) };
    for _ in 0..3 {
        if !later(to, old) {
            return false;
        }
        // SAFETY: as above.
        let seen = unsafe { cmpxchg(p, old, to) };
        if seen == old {
            return true;
        }
        old = seen;
    }
    false
}

/// Is `a` past `b` (two `gen_state` words; generations compared modulo 2^32)?
#[inline(always)]
fn later(a: u64, b: u64) -> bool {
    let d = (a as u32).wrapping_sub(b as u32) as i32;
    let idle = watchdog_common::ReqState::Idle as u64;
    d > 0 || (d == 0 && (a >> 32) == idle && (b >> 32) != idle)
}

/// The peer sent FIN: a later RST is the answer to our own write, not a new hang-up.
pub const SOCK_PEER_FIN: u32 = 1;
/// The server answered `101 Switching Protocols`: no more requests on this connection.
pub const SOCK_UPGRADED: u32 = 2;
/// The frame walk of this HTTP/2 connection lost its place: no more streams are followed.
pub const SOCK_H2_LOST: u32 = 4;
/// The frame walk of the bytes the server sent before the connection's protocol was known
/// lost its place (it matters only if the connection turns out to speak HTTP/2).
pub const SOCK_TX_LOST: u32 = 8;
/// The HTTP/1.x request in flight has no whole head yet: its reads are scanned for the blank
/// line (`request::head_more`). Every other in-flight read pays only this flag test.
pub const SOCK_HEAD_PENDING: u32 = 16;
/// Taken into tracking by the socket iterator (`programs/adopt.rs`), not at accept: sock_ops
/// never asked for this socket's state changes, so its close and peer FIN come through the
/// `inet_sock_set_state` tracepoint instead.
pub const SOCK_ADOPTED: u32 = 32;

#[btf_map]
pub static SOCKS: SkStorage<SockState> = SkStorage::new();

/// The syscall set's stand-in for `SOCKS`: the same state, keyed by socket cookie, because a
/// socket found through a file table is an untyped pointer that socket storage refuses.
#[btf_map]
pub static SOCK_STATES: HashMap<u64, SockState, { MAX_CONNS as usize }> = HashMap::new();

/// Syscall set: processes (tgid) that accepted a tracked connection, or were forked by one. Every
/// other process leaves the syscall program after this one lookup.
#[btf_map]
pub static OWNERS: HashMap<u32, u32, { MAX_TASKS as usize }> = HashMap::new();

#[btf_map]
pub static CONNS: HashMap<u64, ConnEntry, { MAX_CONNS as usize }> = HashMap::new();

/// `CONNS`'s counterpart for HTTP/2: one entry per stream in flight, with its own timer.
#[btf_map]
pub static STREAMS: HashMap<StreamKey, StreamEntry, { MAX_STREAMS as usize }> = HashMap::new();

/// Per-CPU room for building a new `CONNS` value (too large for the program stack). Its type
/// has the same layout with a plain timer field: per-CPU maps may not hold a `bpf_timer`.
#[btf_map]
pub static CONN_SCRATCH: PerCpuArray<ConnRecord, 1> = PerCpuArray::new();

/// Per-CPU room for building a new `STREAMS` value (as `CONN_SCRATCH`).
#[btf_map]
pub static STREAM_SCRATCH: PerCpuArray<StreamRecord, 1> = PerCpuArray::new();

/// `STREAMS` value. Same layout as `watchdog_common::StreamRecord`.
#[repr(C)]
pub struct StreamEntry {
    pub timer: bpf_timer,
    pub info: StreamInfo,
    pub head: [u8; watchdog_common::head::HEAD_BYTES],
}

const _: () = assert!(
    core::mem::size_of::<StreamEntry>() == core::mem::size_of::<watchdog_common::StreamRecord>()
);

#[btf_map]
pub static TASKS: HashMap<u32, TaskInfo, { MAX_TASKS as usize }> = HashMap::new();

#[btf_map]
pub static PORTS: Array<PortConfig, { PORT_ENTRIES as usize }> = Array::new();

/// Written by userspace only: the stamp of a pinned state.
#[btf_map]
pub static META: Array<Meta, 1> = Array::new();

#[btf_map]
pub static EVENTS: RingBuf<Event, { EVENTS_BYTES as usize }> = RingBuf::new();

#[btf_map]
pub static STATS: PerCpuArray<u64, { stat::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
pub static PORT_STATS: PerCpuArray<u64, { (MAX_STAT_SLOTS * port_stat::STRIDE) as usize }> =
    PerCpuArray::new();

/// Routes: (port index, method code, path prefix) -> deadline and metrics slot. Written by
/// userspace; longest-prefix lookup (see `watchdog_common::head::route_key`).
#[btf_map]
pub static ROUTES: LpmTrie<[u8; ROUTE_KEY_DATA], RouteValue, { ROUTE_ENTRIES as usize }> =
    LpmTrie::new();

/// Per-CPU room for the bytes of one read scanned for a head's end (`head::scan_blank`).
#[btf_map]
pub static BLANK_SCRATCH: PerCpuArray<[u8; watchdog_common::head::BLANK_SCAN], 1> =
    PerCpuArray::new();

/// Per-CPU room for building a route key.
#[btf_map]
pub static SCRATCH: PerCpuArray<RouteKey, 1> = PerCpuArray::new();

#[inline(always)]
pub fn count(index: u32) {
    add(&STATS, index, 1);
}

#[inline(always)]
pub fn port_count(slot: u32, index: u32, value: u64) {
    if slot < MAX_STAT_SLOTS {
        add(&PORT_STATS, slot * port_stat::STRIDE + index, value);
    }
}

#[inline(always)]
fn add<const N: usize>(map: &PerCpuArray<u64, N>, index: u32, value: u64) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, written only by this CPU with preemption off.
        unsafe { *p += value };
    }
}

/// The tracked-connection state of a socket, or null for every other socket: socket-local
/// storage in the sock set, `SOCK_STATES[cookie]` in the syscall set. `sk` is a socket the
/// verifier knows as one (a tracepoint's `struct sock *`, or a sock_ops context's `sk`);
/// `cookie` gives its cookie, asked for only in the syscall set.
#[inline(always)]
pub fn sock_state(sk: *mut c_void, cookie: impl FnOnce() -> u64) -> *mut SockState {
    if syscall_set() {
        return SOCK_STATES.get_ptr_mut(cookie()).unwrap_or(ptr::null_mut());
    }
    // SAFETY: lookup without create on a socket pointer the verifier typed (see above).
    unsafe { bpf_sk_storage_get(ptr::addr_of!(SOCKS) as *mut c_void, sk, ptr::null_mut(), 0) }
        .cast()
}

/// The config of `port`, falling back to the wildcard entry at index 0; with the index used
/// (the port of its route-table keys).
#[inline(always)]
pub fn port_config(port: u32) -> Option<(u16, &'static PortConfig)> {
    let cfg = PORTS.get(port)?;
    if cfg.flags != 0 {
        return Some((port as u16, cfg));
    }
    let any = PORTS.get(0)?;
    (any.flags != 0).then_some((0, any))
}

/// Records the current task as a request owner; returns its life stamp (0 if the table is full).
#[inline(always)]
pub fn task_life(tid: u32, now: u64, cookie: u64, gen: u32) -> u64 {
    if let Some(t) = TASKS.get_ptr_mut(tid) {
        // SAFETY: map value pointer from a successful lookup.
        unsafe {
            (*t).cur_cookie = cookie;
            (*t).cur_gen = gen;
            return (*t).life;
        }
    }
    let fresh = TaskInfo {
        life: now,
        cur_cookie: cookie,
        cur_gen: gen,
        _pad: 0,
    };
    if TASKS.insert(tid, fresh, BPF_NOEXIST.into()).is_err() {
        count(stat::TASKS_TABLE_FULL);
        return 0;
    }
    now
}

/// Writes an event about the connection in `e` as it is now; counts it as lost when the ring
/// buffer is full.
#[inline(always)]
pub fn emit(kind: EventKind, ts_ns: u64, e: *const ConnEntry) -> bool {
    let Some(mut slot) = EVENTS.reserve(0) else {
        count(stat::EVENTS_LOST);
        return false;
    };
    let ev = slot.as_mut_ptr();
    // SAFETY: `ev` is the reserved record (submitted below, never read before it is written);
    // `e` points into CONNS.
    unsafe {
        (*ev).kind = kind as u32;
        (*ev).version = LAYOUT_VERSION;
        (*ev).ts_ns = ts_ns;
        (*ev).conn = (*e).info;
        (*ev).head = (*e).head;
    }
    slot.submit(0);
    true
}
