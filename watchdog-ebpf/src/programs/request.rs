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
        count, locked_add, port_config, port_count, sock_state, task_life, ConnEntry, SockState,
        ARMED_FIRED, CONNS, SOCK_UPGRADED,
    },
    programs::{
        connection::init_timer,
        h2,
        head::{self, Route},
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
    st.state = ReqState::InFlight as u32;
    st.gen = st.gen.wrapping_add(1);
    st.stat_slot = st.slot;
    // SAFETY: helpers without arguments.
    let (now, pid_tgid) = unsafe { (bpf_ktime_get_ns(), bpf_get_current_pid_tgid()) };
    let tid = pid_tgid as u32;
    let life = task_life(tid, now, st.cookie, st.gen);
    // SAFETY: `e` points into CONNS.
    let info = unsafe { &mut (*e).info };
    let Some((port_index, cfg)) = port_config(info.local_port as u32) else {
        port_count(st.slot, port_stat::STARTED, 1);
        return;
    };
    // The request's first bytes: not for encrypted connections.
    let (state, len) = if st.proto == proto::TLS as u32 {
        (head_state::NONE, 0)
    } else {
        head::capture(e, regs, ret)
    };
    if st.gen == 1 {
        // SAFETY: `e` points into CONNS; `len` bytes of its head were just written.
        st.proto = u32::from(classify(unsafe { &(*e).head }, usize::from(len)));
        port_count(st.slot, port_stat::PROTO + st.proto, 1);
        if st.proto == u32::from(proto::HTTP2) {
            // From here on a request is a stream (`h2.rs`), starting after the preface.
            st.state = ReqState::Idle as u32;
            info.proto = proto::HTTP2;
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
    port_count(st.stat_slot, port_stat::STARTED, 1);
    info.start_ns = now;
    info.gen = st.gen;
    info.tid = tid;
    info.tgid = (pid_tgid >> 32) as u32;
    info.owner_life = life;
    info.deadline_ns = deadline_ns;
    info.state = ReqState::InFlight as u32;
    info.flags = flags;
    info.proto = st.proto as u8;
    info.head_state = head_state;
    info.head_len = len;
    if life != 0 && flags & conn_flag::NO_DEADLINE == 0 {
        // SAFETY: `e` points into CONNS (a successful lookup above).
        unsafe { arm_for(e, now.saturating_add(deadline_ns), deadline_ns) };
    }
}

/// Makes sure the connection's timer fires at or before `due` (= request start + `deadline_ns`).
///
/// `bpf_timer_start` costs about as much as the rest of the request path together, so a timer
/// already armed for an earlier moment (an earlier request on this keep-alive connection) is left
/// alone: when it fires, the callback finds this request in flight, not yet due, and moves the
/// timer to its deadline (`on_deadline`). That is safe only if the callback cannot have read the
/// connection before this request's fields were written. The callback marks `armed_ns` with a
/// locked add (`ARMED_FIRED`) before it reads the record; this function does a locked add of
/// zero to the same word after writing the fields, then reads it. The two locked operations are
/// ordered: if ours comes first, the callback's read comes after our fields are visible; if
/// the callback's comes first, we see the mark and arm the timer ourselves. (This replaced a
/// second clock read: 26 ns less per tracked start, `cargo xtask bench --only ablation`.)
///
/// # Safety
/// `e` points into `CONNS`.
#[inline(always)]
unsafe fn arm_for(e: *mut ConnEntry, due: u64, deadline_ns: u64) {
    // SAFETY: `e` points into CONNS (the caller's contract).
    let armed_ns = unsafe { ptr::addr_of_mut!((*e).armed_ns) };
    // SAFETY: as above; the locked add orders the field writes above before the read below.
    let armed = unsafe {
        locked_add(armed_ns, 0);
        ptr::read_volatile(armed_ns)
    };
    if armed != 0 && armed & ARMED_FIRED == 0 && armed <= due {
        return;
    }
    // SAFETY: as above.
    let timer = unsafe { ptr::addr_of_mut!((*e).timer) };
    // SAFETY: the timer lives in CONNS; re-arming moves an armed timer. A timer whose init
    // failed at accept (allocation in softirq) is initialised here, in process context.
    let armed = unsafe { bpf_timer_start(timer, deadline_ns, 0) } == 0
        || (unsafe { init_timer(e) } && unsafe { bpf_timer_start(timer, deadline_ns, 0) } == 0);
    if armed {
        // The timer fires at call time + deadline_ns, never before `due`. A plain time: it
        // clears `ARMED_FIRED`.
        // SAFETY: as above.
        unsafe { *armed_ns = due };
    } else {
        // Userspace's backstop sweep enforces this request's deadline instead.
        // SAFETY: as above.
        unsafe { (*e).info.flags |= conn_flag::UNARMED };
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
#[inline(always)]
pub fn end_request(st: &mut SockState, regs: impl Fn() -> *const u64, ret: u64) {
    if st.state != ReqState::InFlight as u32 {
        return;
    }
    st.state = ReqState::Idle as u32;
    let Some(e) = CONNS.get_ptr_mut(st.cookie) else {
        return;
    };
    // SAFETY: `e` points into CONNS.
    let info = unsafe { &mut (*e).info };
    let upgraded = st.proto == proto::HTTP1 as u32
        && port_config(u32::from(info.local_port))
            .is_some_and(|(_, cfg)| cfg.flags & PORT_NO_UPGRADES == 0)
        && head::is_switching_protocols(regs(), ret);
    if upgraded {
        st.flags |= SOCK_UPGRADED;
        port_count(st.slot, port_stat::UPGRADED, 1);
    }
    info.state = ReqState::Idle as u32;
    if upgraded {
        info.flags |= conn_flag::UPGRADED;
    }
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
