//! Connection lifecycle: accept on a watched port, peer FIN / RST, close.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{
        bpf_sock, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT,
    },
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_storage_get, bpf_timer_init,
        bpf_timer_set_callback, bpf_timer_start,
    },
    macros::{btf_tracepoint, sock_ops},
    programs::{BtfTracePointContext, SockOpsContext},
    EbpfContext,
};
use watchdog_common::{
    conn_flag, port_stat, stat, ConnInfo, EventKind, ReqState, LAYOUT_VERSION, PORT_CLIENT_GONE,
};

use crate::maps::{
    cmpxchg, count, emit, fetch_add, fetch_or, port_config, port_count, sock_state, syscall_set,
    xchg, ConnEntry, H2Dir, SockState, ARMED_FIRED, CONNS, CONN_SCRATCH, EVENTS, SOCKS,
    SOCK_ADOPTED, SOCK_PEER_FIN, SOCK_STATES, TASKS,
};

pub const AF_INET: u32 = 2;
const CLOCK_MONOTONIC: u64 = 1;

/// `sock_ops` on the cgroup v2 root: every TCP socket of the host passes here.
#[sock_ops]
pub fn conn_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_accept(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state(&ctx),
        _ => {}
    }
    1
}

fn sk_of(ctx: &SockOpsContext) -> *mut bpf_sock {
    // SAFETY: ctx.ops is the kernel's bpf_sock_ops context; `sk` may be null (checked by callers).
    unsafe { (*ctx.ops).__bindgen_anon_2.sk }
}

#[inline(always)]
pub fn addr(family: u32, v4: u32, v6: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    if family == AF_INET {
        out[10] = 0xff;
        out[11] = 0xff;
        out[12..16].copy_from_slice(&v4.to_ne_bytes());
    } else {
        for (i, w) in v6.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
    }
    out
}

/// A connection was accepted: track it if its local port is watched.
fn on_accept(ctx: &SockOpsContext) {
    let local_port = ctx.local_port();
    let Some((_, cfg)) = port_config(local_port) else {
        return;
    };
    let sk = sk_of(ctx);
    if sk.is_null() {
        return;
    }
    // SAFETY: helper call with the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Context fields are read one by one with volatile loads: the verifier accepts only direct
    // loads at constant offsets, and LLVM would otherwise fold the addresses into registers.
    let ops = ctx.ops;
    // SAFETY: each read is a field of the kernel's bpf_sock_ops context.
    let (family, l4, r4, rport) = unsafe {
        (
            ptr::read_volatile(ptr::addr_of!((*ops).family)),
            ptr::read_volatile(ptr::addr_of!((*ops).local_ip4)),
            ptr::read_volatile(ptr::addr_of!((*ops).remote_ip4)),
            ptr::read_volatile(ptr::addr_of!((*ops).remote_port)),
        )
    };
    let mut l6 = [0u32; 4];
    let mut r6 = [0u32; 4];
    if family != AF_INET {
        for i in 0..4 {
            // SAFETY: as above.
            unsafe {
                l6[i] = ptr::read_volatile(ptr::addr_of!((*ops).local_ip6[i]));
                r6[i] = ptr::read_volatile(ptr::addr_of!((*ops).remote_ip6[i]));
            }
        }
    }
    let info = ConnInfo {
        cookie,
        local_addr: addr(family, l4, l6),
        remote_addr: addr(family, r4, r6),
        local_port: local_port as u16,
        remote_port: u16::from_be((rport >> 16) as u16),
        slot: cfg.slot as u16,
        family: family as u16,
        ..ConnInfo::default()
    };
    if track(sk.cast(), &info, cfg.slot, false) {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

/// Takes a connection into tracking: its `CONNS` record (idle, no request yet) with its timer
/// initialised, then its per-socket state. The one way in, for an accept (`on_accept`) and for
/// a connection open before its port was watched (`adopted`: `programs/adopt.rs`, which flags
/// both the record and the state). False, counted, when a table had no room or the connection
/// is tracked already (its record exists).
///
/// `sk` is a socket the verifier knows as one (the sock_ops context's, or the iterator's).
#[inline(always)]
pub fn track(sk: *mut c_void, info: &ConnInfo, slot: u32, adopted: bool) -> bool {
    let cookie = info.cookie;
    // The new record is built in per-CPU scratch: it is too large for the program stack.
    let Some(entry) = CONN_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch value (preemption is off in these programs). The timer is
    // initialised below, in the inserted copy; the rest starts as zeroes.
    unsafe {
        (*entry).info = *info;
        if adopted {
            (*entry).info.flags = conn_flag::ADOPTED;
        }
        (*entry).armed_ns = 0;
        (*entry).seq = 0;
        ptr::write_bytes(ptr::addr_of_mut!((*entry).head), 0, 1);
    }
    // SAFETY: as above; `ConnRecord` and `ConnEntry` have the same layout (asserted in maps).
    if CONNS
        .insert(
            cookie,
            unsafe { &*entry.cast::<ConnEntry>() },
            BPF_NOEXIST.into(),
        )
        .is_err()
    {
        if !adopted || CONNS.get_ptr(cookie).is_none() {
            count(stat::CONNS_TABLE_FULL);
        }
        return false;
    }
    let Some(e) = CONNS.get_ptr_mut(cookie) else {
        return false;
    };
    // SAFETY: `e` points into CONNS (the lookup above).
    // Best effort at accept (softirq): allocation can fail under a burst of accepts; request
    // start retries in process context.
    if !unsafe { init_timer(e) } {
        count(stat::TIMER_INIT_ERRORS);
    }
    let init = SockState {
        cookie,
        gen: 0,
        state: ReqState::Idle as u32,
        slot,
        flags: if adopted { SOCK_ADOPTED } else { 0 },
        stat_slot: slot,
        proto: 0,
        h2_rx: H2Dir::START,
        h2_tx: H2Dir::START,
        head_tail: 0,
        _pad: 0,
    };
    if !create_state(sk, &init) {
        let _ = CONNS.remove(cookie);
        count(stat::SOCK_STATES_TABLE_FULL);
        return false;
    }
    count(stat::CONNS_OPENED);
    if adopted {
        count(stat::CONNS_ADOPTED);
        port_count(slot, port_stat::ADOPTED, 1);
    }
    true
}

/// TCP state change on a tracked connection.
fn on_state(ctx: &SockOpsContext) {
    let new_state = ctx.arg(1);
    if new_state != BPF_TCP_CLOSE_WAIT && new_state != BPF_TCP_CLOSE {
        return;
    }
    let sk = sk_of(ctx);
    if sk.is_null() {
        return;
    }
    let st = state_of(ctx, sk);
    if st.is_null() {
        return;
    }
    // SAFETY: non-null storage pointer.
    state_changed(unsafe { &mut *st }, new_state);
}

/// A tracked connection's peer sent FIN (`BPF_TCP_CLOSE_WAIT`) or it closed (`BPF_TCP_CLOSE`);
/// both ways of seeing it (sock_ops for accepted connections, `inet_sock_set_state` for
/// adopted ones) end here.
#[inline(always)]
pub fn state_changed(st: &mut SockState, new_state: u32) {
    let in_flight = st.state == ReqState::InFlight as u32;
    if new_state == BPF_TCP_CLOSE_WAIT {
        st.flags |= SOCK_PEER_FIN;
        if in_flight {
            peer_gone(st.cookie, EventKind::PeerFin);
        }
        return;
    }
    // Closed: the request (if any) ends without a response; forget the connection.
    if in_flight {
        st.state = ReqState::Idle as u32;
        port_count(
            st.stat_slot,
            watchdog_common::port_stat::CLOSED_IN_FLIGHT,
            1,
        );
    }
    let cookie = st.cookie;
    if syscall_set() {
        let _ = SOCK_STATES.remove(cookie);
    }
    // Counted whether or not the daemon dropped the connection from `CONNS` while it was idle
    // (`evict.rs`): `CONNS_OPENED - CONNS_CLOSED` is the tracked connections still open.
    let _ = CONNS.remove(cookie);
    count(stat::CONNS_CLOSED);
}

/// Initialises the deadline timer of a `CONNS` entry. False if the kernel refused.
///
/// # Safety
/// `e` points into `CONNS`.
#[inline(always)]
pub unsafe fn init_timer(e: *mut ConnEntry) -> bool {
    // SAFETY: `e` points into CONNS; the timer belongs to that map.
    unsafe {
        let map = ptr::addr_of!(CONNS) as *mut c_void;
        bpf_timer_init(ptr::addr_of_mut!((*e).timer), map, CLOCK_MONOTONIC) == 0
            && bpf_timer_set_callback(ptr::addr_of_mut!((*e).timer), on_deadline as *mut c_void)
                == 0
    }
}

/// Creates the per-socket state of a newly tracked connection: socket-local storage for the
/// sock set, `SOCK_STATES[cookie]` for the syscall set. False if there was no room.
#[inline(always)]
fn create_state(sk: *mut c_void, init: &SockState) -> bool {
    if syscall_set() {
        return SOCK_STATES
            .insert(init.cookie, *init, BPF_NOEXIST.into())
            .is_ok();
    }
    // SAFETY: `sk` is the non-null socket of this context; SOCKS is socket-local storage.
    let st = unsafe {
        bpf_sk_storage_get(
            ptr::addr_of!(SOCKS) as *mut c_void,
            sk,
            ptr::addr_of!(*init) as *mut c_void,
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    };
    !st.is_null()
}

/// The per-socket state of the sock_ops context's socket, or null if it is not tracked.
#[inline(always)]
fn state_of(ctx: &SockOpsContext, sk: *mut bpf_sock) -> *mut SockState {
    // SAFETY: helper call with the sock_ops context.
    sock_state(sk.cast(), || unsafe { bpf_get_socket_cookie(ctx.as_ptr()) })
}

/// The peer hung up on a request in flight: tell userspace if the port asks for it.
#[inline(always)]
fn peer_gone(cookie: u64, kind: EventKind) {
    let Some(e) = CONNS.get_ptr(cookie) else {
        return;
    };
    // SAFETY: map value pointer from a successful lookup.
    let info = unsafe { (*e).info };
    let Some((_, cfg)) = port_config(info.local_port as u32) else {
        return;
    };
    if cfg.flags & PORT_CLIENT_GONE == 0
        || info.state != ReqState::InFlight as u32
        || info.flags & conn_flag::NO_DEADLINE != 0
    {
        return;
    }
    // SAFETY: helper without arguments.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    // A lost client-gone event is counted (`EVENTS_LOST`), not recovered: its request still has
    // its deadline.
    let _ = emit(kind, ts_ns, e);
}

/// `tcp_receive_reset(struct sock *sk)`: the peer sent RST.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn conn_enter_receive_reset(ctx: BtfTracePointContext) -> u32 {
    let sk: *mut c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's typed socket pointer.
    let st: *const SockState = sock_state(sk, || unsafe { bpf_get_socket_cookie(sk) });
    if !st.is_null() {
        // SAFETY: non-null storage pointer.
        let st = unsafe { &*st };
        // After a FIN, a RST only answers the server's own write to a closed peer.
        if st.state == ReqState::InFlight as u32 && st.flags & SOCK_PEER_FIN == 0 {
            peer_gone(st.cookie, EventKind::PeerReset);
        }
    }
    0
}

/// Timer callback: the moment the connection's timer was armed for has come.
///
/// Runs in softirq context. Writes an event only if the request in flight is due and its owner
/// is the same live task that started it. A request in flight that is not due yet started while
/// the timer was armed for an earlier one (see `request::arm_for`): the timer moves to its
/// deadline. The record is read as one consistent copy (seqlock, `ConnEntry::seq`); a copy torn
/// by a start in progress is dropped, and that start arms the timer itself (`request::arm_for`
/// has the argument).
unsafe extern "C" fn on_deadline(_map: *mut c_void, _key: *mut u64, e: *mut ConnEntry) -> i32 {
    // SAFETY: the kernel passes the map value this timer lives in.
    let (armed_ns, seq) = unsafe {
        (
            ptr::addr_of_mut!((*e).armed_ns),
            ptr::addr_of_mut!((*e).seq),
        )
    };
    // Marked before the record is read: a request start that sees the mark arms the timer
    // itself, one that does not can rely on the reads below seeing its record.
    // SAFETY: as above.
    let marked = unsafe { fetch_or(armed_ns, ARMED_FIRED) } | ARMED_FIRED;
    // SAFETY: as above; the fetches are fully ordered reads around the copy.
    let (s1, info, s2) = unsafe {
        (
            fetch_add(seq, 0),
            ptr::read_volatile(ptr::addr_of!((*e).info)),
            fetch_add(seq, 0),
        )
    };
    if s1 & 1 != 0 || s1 != s2 {
        count(stat::DEADLINES_RACED);
        return 0;
    }
    if info.state != ReqState::InFlight as u32 || info.flags & conn_flag::NO_DEADLINE != 0 {
        count(stat::DEADLINES_STALE);
        return 0;
    }
    match TASKS.get_ptr(info.tid) {
        // SAFETY: map value pointer from a successful lookup.
        Some(t) if unsafe { (*t).life } == info.owner_life => {}
        _ => {
            count(stat::DEADLINES_STALE);
            return 0;
        }
    }
    // SAFETY: helper without arguments.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    let due = info.start_ns.saturating_add(info.deadline_ns);
    // SAFETY: `flags` starts an aligned u64 of the record.
    let flags = unsafe { ptr::addr_of_mut!((*e).info.flags) }.cast::<u64>();
    if due > ts_ns {
        // The new time before the timer (`arm_for`'s order); a start that changed the word since
        // the mark arms by itself.
        // SAFETY: as above.
        if unsafe { cmpxchg(armed_ns, marked, due) } != marked {
            count(stat::DEADLINES_RACED);
            return 0;
        }
        // SAFETY: the timer of this map value; re-arming from its own callback is allowed.
        if unsafe { bpf_timer_start(ptr::addr_of_mut!((*e).timer), due - ts_ns, 0) } == 0 {
            count(stat::DEADLINES_REARMED);
        } else {
            // SAFETY: as above; userspace's backstop sweep looks for this flag.
            unsafe {
                xchg(armed_ns, 0);
                fetch_or(flags, u64::from(conn_flag::UNARMED));
            }
            count(stat::TIMER_START_ERRORS);
        }
        return 0;
    }
    match emit_deadline(ts_ns, e, &info, seq, s1) {
        Emitted::Sent => count(stat::DEADLINES_FIRED),
        Emitted::Moved => count(stat::DEADLINES_RACED),
        Emitted::Lost => {
            count(stat::DEADLINES_FIRED);
            // SAFETY: as above; userspace's backstop sweep looks for this flag.
            unsafe { fetch_or(flags, u64::from(conn_flag::EVENT_LOST)) };
        }
    }
    0
}

/// What became of a deadline event.
enum Emitted {
    Sent,
    /// The ring buffer was full (counted as `EVENTS_LOST`).
    Lost,
    /// A new request started while the event was written: discarded (the request it named
    /// has ended; the new one armed the timer itself).
    Moved,
}

/// Writes the deadline event of `info` (a consistent copy taken at sequence `s1`) with the
/// record's head, and submits it only if the sequence has not moved since: an event never mixes
/// two requests.
#[inline(always)]
fn emit_deadline(
    ts_ns: u64,
    e: *const ConnEntry,
    info: &ConnInfo,
    seq: *mut u64,
    s1: u64,
) -> Emitted {
    let Some(mut slot) = EVENTS.reserve(0) else {
        count(stat::EVENTS_LOST);
        return Emitted::Lost;
    };
    let ev = slot.as_mut_ptr();
    // SAFETY: `ev` is the reserved record (submitted or discarded below, never read before it
    // is written); `e` points into CONNS.
    unsafe {
        (*ev).kind = EventKind::Deadline as u32;
        (*ev).version = LAYOUT_VERSION;
        (*ev).ts_ns = ts_ns;
        (*ev).conn = *info;
        (*ev).head = (*e).head;
    }
    // SAFETY: `seq` is the record's sequence word.
    if unsafe { fetch_add(seq, 0) } != s1 {
        slot.discard(0);
        return Emitted::Moved;
    }
    slot.submit(0);
    Emitted::Sent
}
