//! Requests on tracked connections: bytes in on an idle connection start one, the first byte
//! out ends it. The sock probe set's two programs here are the hot path: every recv and send on
//! the host. `start_request` / `end_request` are shared with the syscall set.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_timer_start},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use watchdog_common::{
    conn_flag,
    h2::PREFACE_LEN,
    head::{classify, head_state, proto, ROUTE_OFF},
    port_stat, stat, ReqState, DURATION_BUCKETS_MS, PORT_NO_UPGRADES, PORT_ROUTES,
};

use crate::{
    maps::{
        advance, cmpxchg, count, fetch_add, fetch_and, fetch_or, gen_state, port_config,
        port_count, sock_state, task_life, xchg, ConnEntry, SockState, ARMED_FIRED, CONNS,
        SOCK_HEAD_PENDING, SOCK_UPGRADED,
    },
    programs::{
        connection::init_timer,
        h2,
        head::{self, Answer, Blank, Route},
    },
};

/// `MSG_PEEK`: a peek reads bytes without consuming them; it starts nothing.
pub const MSG_PEEK: i32 = 2;

/// The tracked-connection state of the tracepoint's socket (sock set: socket-local storage).
#[inline(always)]
fn state_of(sk: *mut c_void) -> *mut SockState {
    // SAFETY: `sk` is the tracepoint's typed socket pointer.
    sock_state(sk, || unsafe { bpf_get_socket_cookie(sk) })
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)`, in the receiving task.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn request_enter_recv(ctx: BtfTracePointContext) -> u32 {
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if ret <= 0 || flags & MSG_PEEK != 0 {
        return 0;
    }
    let st = state_of(ctx.arg(0));
    if st.is_null() {
        return 0;
    }
    // SAFETY: non-null storage pointer.
    bytes_in(unsafe { &mut *st }, head::current_regs, ret as u64);
    0
}

/// Bytes came in on a tracked connection (both probe sets). `regs` gives the receiving task's
/// saved user registers, asked for only when the bytes are read.
#[inline(always)]
pub fn bytes_in(st: &mut SockState, regs: impl Fn() -> *const u64, ret: u64) {
    if st.proto == u32::from(proto::HTTP2) {
        h2::on_recv(st, regs(), ret, 0);
    } else if st.state == ReqState::Idle as u32 {
        start_request(st, regs(), ret);
    } else if st.flags & SOCK_HEAD_PENDING != 0 {
        head_more(st, regs(), ret);
    }
}

/// Bytes went out on a tracked connection (both probe sets). Before the first request the
/// server's writes are walked as HTTP/2 frames too, in case the connection turns out to be one.
#[inline(always)]
pub fn bytes_out(st: &mut SockState, regs: impl Fn() -> *const u64 + Copy, ret: u64) {
    if st.proto == u32::from(proto::HTTP2) || st.gen == 0 {
        h2::on_send(st, regs(), ret);
        if st.proto == u32::from(proto::HTTP2) {
            return;
        }
    }
    if st.state == ReqState::InFlight as u32 {
        end_request(st, regs, ret);
    }
}

/// Bytes came in on an idle tracked connection: a request starts, owned by the current thread.
/// `regs` are the receiving task's saved user registers and `ret` the bytes received: the
/// request's first bytes are copied from that buffer (see `head.rs`).
///
/// The request is claimed with one compare-and-swap of the socket's (gen, state) word, so two
/// threads reading the same connection at once start it once; its record is written inside the
/// connection's seqlock (`ConnEntry::seq`, odd while writing) and published by moving the
/// record's (gen, state) word forward (`maps::advance`), never back. See `arm_for` for why no
/// interleaving with the timer callback or the request's end loses a request.
#[inline(always)]
pub fn start_request(st: &mut SockState, regs: *const u64, ret: u64) {
    if st.flags & SOCK_UPGRADED != 0 {
        return;
    }
    // No record: the daemon dropped this idle connection from tracking to make room for
    // others (`evict.rs`); its requests are no longer followed, or counted.
    let Some(e) = CONNS.get_ptr_mut(st.cookie) else {
        return;
    };
    let word = ptr::addr_of_mut!(st.gen).cast::<u64>();
    let prev = st.gen;
    let gen = prev.wrapping_add(1);
    let idle = gen_state(prev, ReqState::Idle as u32);
    // SAFETY: `gen` and `state` are one aligned u64 of the socket's state (asserted below).
    if unsafe { cmpxchg(word, idle, gen_state(gen, ReqState::InFlight as u32)) } != idle {
        // Another thread's read of this connection started (or a send ended) the request first.
        return;
    }
    st.stat_slot = st.slot;
    st.flags &= !SOCK_HEAD_PENDING;
    // SAFETY: helpers without arguments.
    let (now, pid_tgid) = unsafe { (bpf_ktime_get_ns(), bpf_get_current_pid_tgid()) };
    let tid = pid_tgid as u32;
    let life = task_life(tid, now, st.cookie, gen);
    // SAFETY: `e` points into CONNS.
    let local_port = unsafe { (*e).info.local_port };
    let Some((port_index, cfg)) = port_config(u32::from(local_port)) else {
        port_count(st.slot, port_stat::STARTED, 1);
        return;
    };
    // SAFETY: `e` points into CONNS.
    let seq = unsafe { ptr::addr_of_mut!((*e).seq) };
    // SAFETY: as above; a plain read is a guess the swap checks.
    let s = unsafe { ptr::read_volatile(seq) };
    // SAFETY: as above.
    if s & 1 != 0 || unsafe { cmpxchg(seq, s, s + 1) } != s {
        // Another start is writing the record (only when a send ended a request this thread
        // had not finished starting): never silent.
        count(stat::STARTS_CONTENDED);
        return;
    }
    // SAFETY: `e` points into CONNS.
    let info = unsafe { &mut (*e).info };
    // The request's first bytes: not for encrypted connections.
    let (state, len) = if st.proto == proto::TLS as u32 {
        (head_state::NONE, 0)
    } else {
        head::capture(e, regs, ret)
    };
    if gen == 1 {
        // SAFETY: `e` points into CONNS; `len` bytes of its head were just written.
        st.proto = u32::from(classify(unsafe { &(*e).head }, usize::from(len)));
        port_count(st.slot, port_stat::PROTO + st.proto, 1);
        if st.proto == u32::from(proto::HTTP2) {
            // From here on a request is a stream (`h2.rs`), starting after the preface.
            // SAFETY: as above.
            unsafe { xchg(word, gen_state(gen, ReqState::Idle as u32)) };
            info.proto = proto::HTTP2;
            // SAFETY: as above: the record is published unchanged (no request in it).
            unsafe { fetch_add(seq, 1) };
            h2::classified(st);
            h2::on_recv(st, regs, ret, PREFACE_LEN);
            return;
        }
    }
    let mut deadline_ns = cfg.deadline_ns;
    let mut flags = 0;
    let mut head_state = state;
    if cfg.flags & PORT_ROUTES != 0 {
        if state == head_state::UNREADABLE {
            port_count(st.slot, port_stat::ROUTE_UNREADABLE, 1);
        } else if state == head_state::READ && st.proto == proto::HTTP1 as u32 {
            match head::route(port_index, e, len) {
                Route::Found(r) => {
                    deadline_ns = r.deadline_ns;
                    st.stat_slot = r.slot;
                    if r.flags & ROUTE_OFF != 0 {
                        flags = conn_flag::NO_DEADLINE;
                    }
                }
                Route::Default => {}
                Route::Split => {
                    head_state = head_state::SPLIT;
                    port_count(st.slot, port_stat::ROUTE_SPLIT, 1);
                }
            }
        }
    }
    // HTTP/1.x: is the head whole in this first read? If not, the request's clock restarts when
    // its blank line arrives (`head_more`): the time until then is the client's.
    let mut pending = false;
    if st.proto == proto::HTTP1 as u32 && state == head_state::READ {
        if let Blank::NotYet(tail) = head::scan_read(regs, ret, 0) {
            pending = true;
            st.head_tail = tail;
            flags |= conn_flag::HEAD_PENDING;
            port_count(st.stat_slot, port_stat::HEAD_PENDING, 1);
        }
    }
    if life == 0 && flags & conn_flag::NO_DEADLINE == 0 {
        // The task table is full (counted in `task_life`): no timer can check this owner, so
        // userspace's backstop sweep enforces the deadline instead.
        flags |= conn_flag::UNARMED;
    }
    port_count(st.stat_slot, port_stat::STARTED, 1);
    info.start_ns = now;
    info.tid = tid;
    info.tgid = (pid_tgid >> 32) as u32;
    info.owner_life = life;
    info.deadline_ns = deadline_ns;
    info.flags = flags;
    info.proto = st.proto as u8;
    info.head_state = head_state;
    info.head_len = len;
    info.last_rx_ns = now;
    // SAFETY: `gen` and `state` of the record are one aligned u64 (asserted below). False if
    // the request already ended (a send saw it in flight before its record was published).
    let live = unsafe {
        advance(
            ptr::addr_of_mut!(info.gen).cast::<u64>(),
            gen_state(gen, ReqState::InFlight as u32),
        )
    };
    // Published: the sequence is even again.
    // SAFETY: as above.
    unsafe { fetch_add(seq, 1) };
    if live && pending {
        st.flags |= SOCK_HEAD_PENDING;
    }
    if live && life != 0 && flags & conn_flag::NO_DEADLINE == 0 {
        // SAFETY: `e` points into CONNS (a successful lookup above).
        unsafe { arm_for(e, now.saturating_add(deadline_ns), deadline_ns) };
    }
}

const _: () = assert!(core::mem::offset_of!(SockState, state) == 12);
const _: () = assert!(core::mem::offset_of!(SockState, gen) == 8);
const _: () = assert!(core::mem::offset_of!(ConnEntry, info) == 16);
const _: () = assert!(core::mem::offset_of!(watchdog_common::ConnInfo, gen) == 64);
const _: () = assert!(core::mem::offset_of!(watchdog_common::ConnInfo, state) == 68);
const _: () = assert!(core::mem::offset_of!(watchdog_common::ConnInfo, flags) == 88);

/// More bytes of an HTTP/1.x request whose head was not whole (`SOCK_HEAD_PENDING`): note when
/// they came (`ConnInfo::last_rx_ns`, for userspace's "has the client stalled?") and scan them,
/// with the last three bytes before them, for the blank line. When it is found the request's
/// clock restarts: `start_ns` becomes now inside the connection's seqlock, `HEAD_PENDING` is
/// cleared, and the timer is re-armed for the new deadline exactly as a start arms it
/// (`arm_for`: the same argument holds, the record is published before the swap). A
/// deadline event of the old clock read after this is dropped by userspace
/// (`tracker::consistent`: same generation, another `start_ns`).
#[inline(always)]
fn head_more(st: &mut SockState, regs: *const u64, ret: u64) {
    let Some(e) = CONNS.get_ptr_mut(st.cookie) else {
        st.flags &= !SOCK_HEAD_PENDING;
        return;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `e` points into CONNS; an aligned u64 store (a racing reader sees old or new).
    unsafe { ptr::write_volatile(ptr::addr_of_mut!((*e).info.last_rx_ns), now) };
    if let Blank::NotYet(tail) = head::scan_read(regs, ret, st.head_tail) {
        st.head_tail = tail;
        return;
    }
    st.flags &= !SOCK_HEAD_PENDING;
    // SAFETY: `e` points into CONNS.
    let seq = unsafe { ptr::addr_of_mut!((*e).seq) };
    // SAFETY: as above; a plain read is a guess the swap checks.
    let s = unsafe { ptr::read_volatile(seq) };
    // SAFETY: as above.
    if s & 1 != 0 || unsafe { cmpxchg(seq, s, s + 1) } != s {
        count(stat::STARTS_CONTENDED);
        return;
    }
    // SAFETY: `e` points into CONNS.
    let info = unsafe { &mut (*e).info };
    let same = info.gen == st.gen && info.state == ReqState::InFlight as u32;
    if same {
        info.start_ns = now;
        // SAFETY: `flags` starts an aligned u64 of the record (asserted below); the mask keeps
        // every other bit of that word.
        unsafe {
            fetch_and(
                ptr::addr_of_mut!(info.flags).cast::<u64>(),
                !u64::from(conn_flag::HEAD_PENDING),
            )
        };
    }
    // SAFETY: as above: published, the sequence is even again.
    unsafe { fetch_add(seq, 1) };
    if !same {
        return;
    }
    port_count(st.stat_slot, port_stat::HEAD_COMPLETED, 1);
    let (flags, life, deadline_ns) = (info.flags, info.owner_life, info.deadline_ns);
    if flags & conn_flag::NO_DEADLINE == 0 && life != 0 {
        // SAFETY: `e` points into CONNS.
        unsafe { arm_for(e, now.saturating_add(deadline_ns), deadline_ns) };
    }
}

/// Makes sure the connection's timer fires at or before `due` (= request start + `deadline_ns`),
/// after the request's record was published.
///
/// `bpf_timer_start` costs about as much as the rest of the request path together, so a timer
/// already armed for an earlier moment (an earlier request on this keep-alive connection) is left
/// alone: when it fires, the callback finds this request in flight, not yet due, and moves the
/// timer to its deadline (`on_deadline`). Why no interleaving loses a request, on any JIT (every
/// step named here is a BPF atomic with `BPF_FETCH`: fully ordered, see `maps.rs`):
///
/// - **Skip only what the callback will see.** The start skips arming only through a
///   compare-and-swap of `armed_ns` from an unfired time `T <= due` to itself. The callback's
///   first act is `fetch_or(armed_ns, ARMED_FIRED)`. Both are read-modify-writes of one word, so
///   one comes first. Swap first: the callback's later `fetch_or`, and every read after it,
///   follow the start's publish (a full barrier sits between the publish and the swap) and see
///   the published record. `fetch_or` first: the swap fails on the mark and the start arms the
///   timer itself. "Callback fired" and "start skipped arming" cannot both happen.
/// - **Never a torn record.** The callback trusts a copy only when the seqlock read the same
///   even value before and after it; otherwise a start is writing, and that start's swap comes
///   after the callback's mark (the mark precedes its read of the odd or newer sequence, which
///   precedes the start's release and swap): it arms by itself. No half-written start (a new
///   `start_ns` with the old deadline) can move the timer later than a deadline.
/// - **Never a lost mark.** Whoever arms stores the new time (`xchg`) *before*
///   `bpf_timer_start`, so a callback of the new arming marks that time, not an overwritten
///   one; a failed start puts 0 back (the next request arms) and flags `UNARMED` for the backstop.
///   A callback of an older arming that marks the new time only makes the next start arm again.
/// - **Never idled by an older end.** A request's end moves the record's (gen, state) word
///   forward with a compare-and-swap, never back, so a send racing another thread's next recv
///   cannot leave a request in flight marked idle.
///
/// What remains is the model's, not a race: bytes that arrive while the previous request is still
/// in flight (pipelining, or a reply whose send hook has not run yet) belong to that request.
///
/// # Safety
/// `e` points into `CONNS`.
#[inline(always)]
unsafe fn arm_for(e: *mut ConnEntry, due: u64, deadline_ns: u64) {
    // SAFETY: `e` points into CONNS (the caller's contract).
    let armed_ns = unsafe { ptr::addr_of_mut!((*e).armed_ns) };
    // SAFETY: as above; a plain read is a guess the swap checks.
    let armed = unsafe { ptr::read_volatile(armed_ns) };
    // SAFETY: as above.
    if armed != 0
        && armed & ARMED_FIRED == 0
        && armed <= due
        && unsafe { cmpxchg(armed_ns, armed, armed) } == armed
    {
        return;
    }
    // The new time first: a callback of this arming marks it (see above).
    // SAFETY: as above.
    unsafe { xchg(armed_ns, due) };
    // SAFETY: as above.
    let timer = unsafe { ptr::addr_of_mut!((*e).timer) };
    // SAFETY: the timer lives in CONNS; re-arming moves an armed timer. A timer whose init
    // failed at accept (allocation in softirq) is initialised here, in process context. The
    // timer fires at call time + deadline_ns, never before `due`.
    let started = unsafe { bpf_timer_start(timer, deadline_ns, 0) } == 0
        || (unsafe { init_timer(e) } && unsafe { bpf_timer_start(timer, deadline_ns, 0) } == 0);
    if !started {
        // SAFETY: as above: no timer is armed, so the next request must arm; userspace's
        // backstop sweep enforces this one.
        unsafe {
            xchg(armed_ns, 0);
            fetch_or(
                ptr::addr_of_mut!((*e).info.flags).cast::<u64>(),
                u64::from(conn_flag::UNARMED),
            );
        }
        count(stat::TIMER_START_ERRORS);
    }
}

/// `sock_send_length(struct sock *sk, int ret, int flags)`, in the sending task.
#[btf_tracepoint(function = "sock_send_length")]
pub fn request_exit_send(ctx: BtfTracePointContext) -> u32 {
    let ret: i32 = ctx.arg(1);
    if ret <= 0 {
        return 0;
    }
    let st = state_of(ctx.arg(0));
    if st.is_null() {
        return 0;
    }
    // SAFETY: non-null storage pointer.
    bytes_out(unsafe { &mut *st }, head::current_regs, ret as u64);
    0
}

/// The first byte went out on a tracked connection: its request (if any) is answered. On an
/// HTTP/1.x connection, a `101 Switching Protocols` answer ends request tracking for good
/// (unless the port's policies said `upgrades = false`: then the answer is not read).
///
/// The socket's (gen, state) word goes from in flight to idle with one compare-and-swap (once
/// per request however many threads send), and the record's word moves forward to (gen, idle)
/// only if it is not already past it (`maps::advance`): a late end never idles a newer request.
#[inline(always)]
pub fn end_request(st: &mut SockState, regs: impl Fn() -> *const u64, ret: u64) {
    let word = ptr::addr_of_mut!(st.gen).cast::<u64>();
    let (gen, state) = (st.gen, st.state);
    if state != ReqState::InFlight as u32 {
        return;
    }
    // HTTP/1.x: an interim answer (`100 Continue`, `102`, `103`) does not end the request.
    let answer = if st.proto == proto::HTTP1 as u32 {
        head::answer(regs(), ret)
    } else {
        Answer::Final
    };
    if answer == Answer::Interim {
        port_count(st.stat_slot, port_stat::INTERIM, 1);
        return;
    }
    let cur = gen_state(gen, state);
    // SAFETY: `gen` and `state` are one aligned u64 of the socket's state.
    if unsafe { cmpxchg(word, cur, gen_state(gen, ReqState::Idle as u32)) } != cur {
        return;
    }
    let Some(e) = CONNS.get_ptr_mut(st.cookie) else {
        return;
    };
    // SAFETY: `e` points into CONNS.
    let info = unsafe { &mut (*e).info };
    let upgraded = answer == Answer::Switching
        && port_config(u32::from(info.local_port))
            .is_some_and(|(_, cfg)| cfg.flags & PORT_NO_UPGRADES == 0);
    if upgraded {
        st.flags |= SOCK_UPGRADED;
        port_count(st.slot, port_stat::UPGRADED, 1);
        // SAFETY: `flags` starts an aligned u64 of the record (asserted above).
        unsafe {
            fetch_or(
                ptr::addr_of_mut!(info.flags).cast::<u64>(),
                u64::from(conn_flag::UPGRADED),
            )
        };
    }
    // SAFETY: as above.
    unsafe {
        advance(
            ptr::addr_of_mut!(info.gen).cast::<u64>(),
            gen_state(gen, ReqState::Idle as u32),
        )
    };
    // SAFETY: helper without arguments.
    let elapsed = unsafe { bpf_ktime_get_ns() }.saturating_sub(info.start_ns);
    port_count(st.stat_slot, port_stat::BUCKETS + bucket(elapsed), 1);
    port_count(st.stat_slot, port_stat::DURATION_SUM_NS, elapsed);
}

/// Index of the histogram bucket for a duration (the last index is `+Inf`).
#[inline(always)]
pub fn bucket(ns: u64) -> u32 {
    let ms = ns / 1_000_000;
    let mut i = 0;
    while i < DURATION_BUCKETS_MS.len() {
        if ms < DURATION_BUCKETS_MS[i] {
            return i as u32;
        }
        i += 1;
    }
    DURATION_BUCKETS_MS.len() as u32
}
