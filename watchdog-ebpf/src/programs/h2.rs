//! HTTP/2 connections: a request is a stream. The frame headers of every read and write of such
//! a connection are walked in the kernel, from the syscall's user buffers (one buffer, or an
//! iovec array), in one `bpf_loop` whose every turn does one bounded piece of work: move to the
//! next iovec, skip payload, or read (part of) a frame header and act on it.
//!
//! - HEADERS in on a new odd stream id: the stream starts. Its entry in `STREAMS` holds its own
//!   timer, armed at the port's `stream_deadline_ns` (the earliest budget of any route or policy
//!   on the port) and the first bytes of its header block. Routes are matched by the daemon,
//!   from those bytes, when the timer fires: a stream on a route with a later budget is timed
//!   from there in userspace. (HPACK parsing in the kernel costs the verifier more than a
//!   program may take, see `watchdog_common::h2`.)
//! - HEADERS or RST_STREAM out: the stream is answered (or refused); its entry goes.
//! - RST_STREAM in on a stream in flight: the client cancelled it: a client-gone event.
//!
//! A frame header split across two calls is carried over in `SockState::h2_rx` / `h2_tx`. A
//! walk that cannot go on (a buffer it cannot read, more pieces than one walk does) marks the
//! connection lost: counted, no more streams started, and its streams dropped when their timers
//! fire. The timer of a stream whose deadline event was written re-arms every `LINGER_NS` only
//! to drop the entry once the connection has closed.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::{Array, PerCpuArray},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, bpf_timer_init,
        bpf_timer_set_callback, bpf_timer_start, generated,
    },
    macros::btf_map,
};
use watchdog_common::{
    conn_flag,
    h2::{frame, FrameHeader, FRAME_HEADER},
    head::{head_state, proto, HEAD_BYTES},
    limits::{MAX_STAT_SLOTS, MAX_STREAMS},
    port_stat, stat, stream_flag, EventKind, ReqState, StreamKey, StreamRecord, PORT_CLIENT_GONE,
};

use crate::{
    maps::{
        count, fetch_add, port_config, port_count, task_life, SockState, StreamEntry, CONNS,
        EVENTS, SOCK_H2_LOST, SOCK_TX_LOST, STREAMS, STREAM_SCRATCH, TASKS,
    },
    programs::{
        abi::{args, nr, reg, sysno},
        request::bucket,
    },
};

/// Turns of one walk: enough for a 64 KiB read of small frames, never unbounded.
const MAX_TURNS: u32 = 1024;
/// Iovecs of one call that a walk follows.
const MAX_SEGS: u64 = 64;
/// Iovecs read at once (a power of two).
const IOV_BATCH: u64 = 8;
/// How often the timer of a reported stream checks that its connection is still open.
const LINGER_NS: u64 = 5_000_000_000;
const CLOCK_MONOTONIC: u64 = 1;

/// `struct iovec`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IoVec {
    base: u64,
    len: u64,
}

/// One walk over the bytes of one call (in `WALKS`).
#[repr(C)]
pub struct Walk {
    cookie: u64,
    /// User address of the call's iovec array; 0 for a single buffer.
    iov: u64,
    niov: u64,
    /// Index, logical offset, user address and length of the current segment.
    seg: u64,
    seg_start: u64,
    seg_base: u64,
    seg_len: u64,
    /// Logical offset of the next byte to look at, and the bytes of the call.
    pos: u64,
    total: u64,
    skip: u64,
    hlen: u64,
    /// 1: bytes the client sent; 0: bytes the server sent.
    rx: u64,
    lost: u64,
    /// The first 8 bytes of a frame header read a byte at a time, big-endian.
    acc: u64,
    /// A frame header read in one piece.
    hdr: [u8; 16],
    /// The current batch of iovecs (`seg / IOV_BATCH`), and whether only its first entry
    /// could be read (then the rest are read one by one).
    iovs: [IoVec; IOV_BATCH as usize],
    seg_mask_one: u64,
}

/// Per-CPU room for the walk of the current call.
#[btf_map]
static WALKS: PerCpuArray<Walk, 1> = PerCpuArray::new();

/// The first user buffer, or the iovec array, of the current recv/send syscall.
#[inline(always)]
fn layout(r: *const u64) -> Option<(u64, u64, u64)> {
    let (sysno, si, dx) = (sysno(r), reg(r, args::A1), reg(r, args::A2));
    match sysno {
        nr::READ | nr::WRITE | nr::RECVFROM | nr::SENDTO => Some((0, si, dx)),
        nr::READV | nr::WRITEV => Some((si, 0, dx)),
        nr::RECVMSG | nr::SENDMSG => {
            // SAFETY: bpf_probe_read_user checks the address; `struct user_msghdr` keeps
            // msg_iov at 16 and msg_iovlen at 24.
            let iov: u64 = unsafe { bpf_probe_read_user((si + 16) as *const u64) }.ok()?;
            // SAFETY: as above.
            let n: u64 = unsafe { bpf_probe_read_user((si + 24) as *const u64) }.ok()?;
            Some((iov, 0, n))
        }
        _ => None,
    }
}

/// Walks the frames in the `ret` bytes of the current call, from byte `from`.
#[inline(always)]
fn walk(st: &mut SockState, r: *const u64, ret: u64, from: u64, rx: bool) -> bool {
    let dir = if rx { &mut st.h2_rx } else { &mut st.h2_tx };
    // Most of a large DATA frame: nothing to look at in this call.
    if from == 0 && u64::from(dir.skip) >= ret {
        dir.skip -= ret as u32;
        return true;
    }
    let Some((iov, base, n)) = layout(r) else {
        return false;
    };
    let Some(w) = WALKS.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's walk (preemption is off in these programs; no other program uses it).
    let w = unsafe { &mut *w };
    w.cookie = st.cookie;
    w.iov = iov;
    w.niov = n;
    // A single buffer is segment 0; an iovec array starts before its first entry, which the
    // first turn reads (with its batch).
    w.seg = if iov == 0 { 0 } else { u64::MAX };
    w.seg_start = 0;
    w.seg_base = base;
    w.seg_len = if iov == 0 { n } else { 0 };
    w.pos = from;
    w.total = ret;
    w.skip = u64::from(dir.skip);
    w.hlen = u64::from(dir.hlen);
    w.rx = u64::from(rx);
    w.lost = 0;
    w.acc = dir.acc;
    // SAFETY: `turn` is a static function of the bpf_loop callback type.
    unsafe { generated::bpf_loop(MAX_TURNS, turn as *mut c_void, ptr::null_mut(), 0) };
    if w.lost != 0 || w.pos < w.total {
        return false;
    }
    dir.skip = w.skip as u32;
    dir.hlen = w.hlen as u32;
    dir.acc = w.acc;
    true
}

/// One turn of a walk: 0 to go on, 1 to stop.
///
/// The walk lives in a map, not on the stack: the verifier knows nothing of the values it
/// loads from there, so every turn starts from the same state and the callback is verified
/// once. (From the caller's stack it would track each offset, see every turn as new, and
/// give up long before `MAX_TURNS`.)
unsafe extern "C" fn turn(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(w) = WALKS.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's walk, set up by `walk`.
    let w = unsafe { &mut *w };
    if w.pos >= w.total {
        return 1;
    }
    let mut seg_end = w.seg_start + w.seg_len;
    if seg_end > w.total {
        seg_end = w.total;
    }
    if w.pos >= seg_end {
        w.seg = w.seg.wrapping_add(1);
        if w.iov == 0 || w.seg >= w.niov || w.seg >= MAX_SEGS {
            w.lost = 1;
            return 1;
        }
        // The iovecs come in batches of `IOV_BATCH`, one read each: a server's write of a
        // few frames is often a dozen small iovecs (grpcio: one per header field).
        let slot = w.seg % IOV_BATCH;
        if slot == 0 {
            let at = w.iov + w.seg * 16;
            // SAFETY: the destination is `iovs` (IOV_BATCH entries); the source is a user
            // address the helper checks. A batch reaching past the end of a short array
            // into unmapped memory fails: then one iovec.
            let rc = unsafe {
                generated::bpf_probe_read_user(
                    w.iovs.as_mut_ptr() as *mut c_void,
                    (IOV_BATCH * 16) as u32,
                    at as *const c_void,
                )
            };
            if rc != 0 {
                // SAFETY: as above, one entry.
                let rc = unsafe {
                    generated::bpf_probe_read_user(
                        w.iovs.as_mut_ptr() as *mut c_void,
                        16,
                        at as *const c_void,
                    )
                };
                if rc != 0 {
                    w.lost = 1;
                    return 1;
                }
                // Only this entry is valid: the next iovec starts a batch of its own.
                w.seg_mask_one = 1;
            } else {
                w.seg_mask_one = 0;
            }
        } else if w.seg_mask_one != 0 {
            // SAFETY: bpf_probe_read_user checks the address.
            match unsafe { bpf_probe_read_user((w.iov + w.seg * 16) as *const IoVec) } {
                Ok(v) => {
                    w.seg_start += w.seg_len;
                    w.seg_base = v.base;
                    w.seg_len = v.len;
                    return 0;
                }
                Err(_) => {
                    w.lost = 1;
                    return 1;
                }
            }
        }
        let v = w.iovs[(slot & (IOV_BATCH - 1)) as usize];
        w.seg_start += w.seg_len;
        w.seg_base = v.base;
        w.seg_len = v.len;
        return 0;
    }
    let in_seg = seg_end - w.pos;
    if w.skip > 0 {
        let t = if w.skip < in_seg { w.skip } else { in_seg };
        w.pos += t;
        w.skip -= t;
        return 0;
    }
    let at = w.seg_base + (w.pos - w.seg_start);
    // Reads have constant sizes: a size computed from the walk's offsets would make the
    // verifier track them exactly, and it could then never see two turns as the same.
    let f = if w.hlen == 0 && in_seg >= FRAME_HEADER as u64 {
        // The whole header is in this segment (the usual case): one read.
        // SAFETY: the destination is `hdr` (16 bytes, FRAME_HEADER written); the source is a
        // user address the helper checks.
        let rc = unsafe {
            generated::bpf_probe_read_user(
                w.hdr.as_mut_ptr() as *mut c_void,
                FRAME_HEADER as u32,
                at as *const c_void,
            )
        };
        if rc != 0 {
            w.lost = 1;
            return 1;
        }
        w.pos += FRAME_HEADER as u64;
        w.hlen = 0;
        FrameHeader::parse(&w.hdr)
    } else {
        // A header split across segments or calls: a byte per turn, shifted into `acc` (no
        // offset computed from the walk, for the same reason).
        let mut byte = 0u8;
        // SAFETY: one byte into a local; the source is a user address the helper checks.
        let rc = unsafe {
            generated::bpf_probe_read_user(
                ptr::addr_of_mut!(byte) as *mut c_void,
                1,
                at as *const c_void,
            )
        };
        if rc != 0 {
            w.lost = 1;
            return 1;
        }
        w.pos += 1;
        if w.hlen < 8 {
            w.acc = (w.acc << 8) | u64::from(byte);
            w.hlen += 1;
            return 0;
        }
        w.hlen = 0;
        let acc = w.acc;
        w.acc = 0;
        FrameHeader {
            len: (acc >> 40) as u32 & 0xff_ffff,
            kind: (acc >> 32) as u8,
            flags: (acc >> 24) as u8,
            stream: (((acc as u32) << 8) | u32::from(byte)) & 0x7fff_ffff,
        }
    };
    w.skip = u64::from(f.len);
    if f.stream == 0 {
        return 0;
    }
    let key = StreamKey {
        cookie: w.cookie,
        id: f.stream,
        _pad: 0,
    };
    match (w.rx != 0, f.kind) {
        (true, frame::HEADERS) if f.stream & 1 == 1 => {
            // The header block's first bytes, as far as this segment has them.
            let off = u64::from(f.block_offset());
            let block = w.pos + off;
            let mut n = u64::from(f.len).saturating_sub(off);
            if block >= seg_end {
                n = 0;
            } else if n > seg_end - block {
                n = seg_end - block;
            }
            start_stream(&key, w.seg_base + (block - w.seg_start), n);
        }
        (true, frame::RST_STREAM) => client_reset(&key),
        (false, frame::HEADERS | frame::RST_STREAM) => end_stream(&key),
        _ => {}
    }
    0
}

/// A client's HEADERS frame on a stream not yet in flight: the stream starts now.
#[inline(always)]
fn start_stream(key: &StreamKey, block: u64, n: u64) {
    if STREAMS.get_ptr(key).is_some() {
        // Trailers, or the HEADERS of a stream already followed.
        return;
    }
    let Some(c) = CONNS.get_ptr(key.cookie) else {
        return;
    };
    // SAFETY: map value pointer from a successful lookup.
    let (local_port, slot) = unsafe { ((*c).info.local_port, (*c).info.slot) };
    let Some((_, cfg)) = port_config(u32::from(local_port)) else {
        return;
    };
    let Some(scratch) = STREAM_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: helpers without arguments.
    let (now, pid_tgid) = unsafe { (bpf_ktime_get_ns(), bpf_get_current_pid_tgid()) };
    let tid = pid_tgid as u32;
    // SAFETY: this CPU's scratch value (preemption is off in these programs).
    let s = unsafe { &mut *scratch };
    s.info.start_ns = now;
    s.info.owner_life = task_life(tid, now, key.cookie, key.id);
    s.info.deadline_ns = cfg.stream_deadline_ns;
    s.info.tid = tid;
    s.info.tgid = (pid_tgid >> 32) as u32;
    s.info.flags = 0;
    s.info.slot = slot;
    s.info.head_state = head_state::UNREADABLE;
    s.info.head_len = 0;
    // The scratch is reused by every stream start on this CPU: zeroed first, then at most the
    // bytes of this frame that the call returned (`n`, bounded by the walk's segment and the
    // syscall's return) are copied, so an event never carries bytes of another stream.
    // SAFETY: `head` of this CPU's scratch value, HEAD_BYTES long.
    unsafe { ptr::write_bytes(ptr::addr_of_mut!(s.head), 0, 1) };
    let n = if n > HEAD_BYTES as u64 {
        HEAD_BYTES as u64
    } else {
        n
    };
    // SAFETY: the destination is the scratch value's `head` (HEAD_BYTES long, `n` at most that);
    // the source is a user address the helper checks.
    if n > 0
        && unsafe {
            generated::bpf_probe_read_user(
                ptr::addr_of_mut!(s.head) as *mut c_void,
                n as u32,
                block as *const c_void,
            )
        } == 0
    {
        s.info.head_state = head_state::READ;
        s.info.head_len = n as u16;
    }
    port_count(u32::from(s.info.slot), port_stat::STARTED, 1);
    // Each port slot may hold at most its share of the table: one h2c client cannot take every
    // port's room.
    let Some(held) = STREAM_SHARES.get_ptr_mut(u32::from(s.info.slot)) else {
        return;
    };
    // SAFETY: an aligned u64 of an array map value.
    if unsafe { fetch_add(held, 1) } >= STREAM_SHARE {
        // SAFETY: as above (adds -1).
        unsafe { fetch_add(held, u64::MAX) };
        count(stat::STREAMS_PORT_FULL);
        return;
    }
    // SAFETY: `StreamRecord` and `StreamEntry` have the same layout (asserted in maps).
    let value = unsafe { &*(s as *const StreamRecord).cast::<StreamEntry>() };
    if STREAMS.insert(key, value, BPF_NOEXIST.into()).is_err() {
        release_share(u32::from(s.info.slot));
        count(stat::STREAMS_TABLE_FULL);
        return;
    }
    count(stat::STREAMS_STARTED);
    let Some(e) = STREAMS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: `e` points into STREAMS; the timer belongs to that map.
    let armed = unsafe {
        let timer = ptr::addr_of_mut!((*e).timer);
        bpf_timer_init(
            timer,
            ptr::addr_of!(STREAMS) as *mut c_void,
            CLOCK_MONOTONIC,
        ) == 0
            && bpf_timer_set_callback(timer, on_stream_timer as *mut c_void) == 0
            && bpf_timer_start(timer, (*e).info.deadline_ns, 0) == 0
    };
    if !armed {
        // SAFETY: as above.
        unsafe { (*e).info.flags |= stream_flag::UNARMED };
        count(stat::TIMER_START_ERRORS);
    }
}

/// Streams in `STREAMS` per metrics slot (a port's, or slot 0 for ports past the first 64).
#[btf_map]
static STREAM_SHARES: Array<u64, { MAX_STAT_SLOTS as usize }> = Array::new();

/// What one port slot may hold of `STREAMS`.
const STREAM_SHARE: u64 = (MAX_STREAMS / 4) as u64;

/// A stream of `slot` left `STREAMS`.
#[inline(always)]
fn release_share(slot: u32) {
    if let Some(held) = STREAM_SHARES.get_ptr_mut(slot) {
        // SAFETY: an aligned u64 of an array map value (adds -1).
        unsafe { fetch_add(held, u64::MAX) };
    }
}

/// The server answered the stream (or reset it): it is no longer in flight.
#[inline(always)]
fn end_stream(key: &StreamKey) {
    let Some(e) = STREAMS.get_ptr(key) else {
        return;
    };
    // SAFETY: map value pointer from a successful lookup; helper without arguments.
    let (start, slot) = unsafe { ((*e).info.start_ns, (*e).info.slot) };
    // SAFETY: helper without arguments.
    let elapsed = unsafe { bpf_ktime_get_ns() }.saturating_sub(start);
    if STREAMS.remove(key).is_ok() {
        release_share(u32::from(slot));
    }
    count(stat::STREAMS_ENDED);
    port_count(u32::from(slot), port_stat::BUCKETS + bucket(elapsed), 1);
    port_count(u32::from(slot), port_stat::DURATION_SUM_NS, elapsed);
}

/// The client reset a stream: if it is in flight, its caller is gone.
#[inline(always)]
fn client_reset(key: &StreamKey) {
    let Some(e) = STREAMS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: map value pointer from a successful lookup.
    let info = unsafe { &mut (*e).info };
    if info.flags & stream_flag::CLIENT_GONE != 0 {
        return;
    }
    info.flags |= stream_flag::CLIENT_GONE;
    let Some(c) = CONNS.get_ptr(key.cookie) else {
        return;
    };
    // SAFETY: map value pointer from a successful lookup.
    let port = u32::from(unsafe { (*c).info.local_port });
    if port_config(port).is_some_and(|(_, cfg)| cfg.flags & PORT_CLIENT_GONE != 0) {
        // SAFETY: helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        emit_stream(EventKind::PeerReset, now, key, e);
    }
}

/// Writes an event about one stream: the connection as `CONNS` has it, with the stream's
/// request fields (see `conn_flag::STREAM`).
#[inline(always)]
fn emit_stream(kind: EventKind, ts_ns: u64, key: &StreamKey, e: *const StreamEntry) -> bool {
    let Some(c) = CONNS.get_ptr(key.cookie) else {
        return false;
    };
    let Some(mut slot) = EVENTS.reserve(0) else {
        count(stat::EVENTS_LOST);
        return false;
    };
    let ev = slot.as_mut_ptr();
    // SAFETY: `ev` is the reserved record, written in full before it is submitted; `c` and `e`
    // point into CONNS and STREAMS.
    unsafe {
        (*ev).kind = kind as u32;
        (*ev).version = watchdog_common::LAYOUT_VERSION;
        (*ev).ts_ns = ts_ns;
        (*ev).conn = (*c).info;
        let s = (*e).info;
        (*ev).conn.start_ns = s.start_ns;
        (*ev).conn.gen = key.id;
        (*ev).conn.tid = s.tid;
        (*ev).conn.tgid = s.tgid;
        (*ev).conn.owner_life = s.owner_life;
        (*ev).conn.deadline_ns = s.deadline_ns;
        (*ev).conn.state = ReqState::InFlight as u32;
        (*ev).conn.flags = conn_flag::STREAM;
        (*ev).conn.proto = proto::HTTP2;
        (*ev).conn.head_state = s.head_state;
        (*ev).conn.head_len = s.head_len;
        (*ev).head = (*e).head;
    }
    slot.submit(0);
    true
}

/// A stream's timer: at its deadline, the event if it is still in flight; after that, every
/// `LINGER_NS`, dropping the entry once its connection is closed.
unsafe extern "C" fn on_stream_timer(
    _map: *mut c_void,
    key: *mut StreamKey,
    e: *mut StreamEntry,
) -> i32 {
    // SAFETY: the kernel passes this timer's key and value.
    let (k, info) = unsafe { (*key, (*e).info) };
    let lost = match CONNS.get_ptr(k.cookie) {
        // SAFETY: map value pointer from a successful lookup.
        Some(c) => (unsafe { (*c).info.flags } & conn_flag::H2_LOST) != 0,
        None => true,
    };
    if lost {
        if STREAMS.remove(&k).is_ok() {
            release_share(u32::from(info.slot));
        }
        count(stat::STREAMS_REAPED);
        return 0;
    }
    if info.flags & stream_flag::REPORTED == 0 {
        // SAFETY: as above.
        unsafe { (*e).info.flags |= stream_flag::REPORTED };
        let owner_lives = match TASKS.get_ptr(info.tid) {
            // SAFETY: map value pointer from a successful lookup.
            Some(t) => (unsafe { (*t).life }) == info.owner_life,
            None => false,
        };
        if owner_lives {
            count(stat::DEADLINES_FIRED);
            // SAFETY: helper without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            emit_stream(EventKind::Deadline, now, &k, e);
        } else {
            count(stat::DEADLINES_STALE);
        }
    }
    // SAFETY: the timer of this map value; re-arming from its own callback is allowed.
    unsafe { bpf_timer_start(ptr::addr_of_mut!((*e).timer), LINGER_NS, 0) };
    0
}

/// Bytes in on an HTTP/2 connection (`from` skips the connection preface).
#[inline(always)]
pub fn on_recv(st: &mut SockState, r: *const u64, ret: u64, from: u64) {
    if st.flags & SOCK_H2_LOST != 0 {
        return;
    }
    if !walk(st, r, ret, from, true) {
        lose(st);
    }
}

/// Bytes out on an HTTP/2 connection, or on one whose protocol is not known yet (a server may
/// write its SETTINGS before the client's preface arrives).
#[inline(always)]
pub fn on_send(st: &mut SockState, r: *const u64, ret: u64) {
    if st.flags & (SOCK_H2_LOST | SOCK_TX_LOST) != 0 {
        return;
    }
    if !walk(st, r, ret, 0, false) {
        if st.proto == u32::from(proto::HTTP2) {
            lose(st);
        } else {
            st.flags |= SOCK_TX_LOST;
        }
    }
}

/// The connection's protocol was just found to be HTTP/2.
#[inline(always)]
pub fn classified(st: &mut SockState) {
    if st.flags & SOCK_TX_LOST != 0 {
        lose(st);
    }
}

/// The walk lost its place: no more streams on this connection.
#[inline(always)]
fn lose(st: &mut SockState) {
    st.flags |= SOCK_H2_LOST;
    st.h2_rx.skip = 0;
    st.h2_rx.hlen = 0;
    st.h2_tx.skip = 0;
    st.h2_tx.hlen = 0;
    count(stat::H2_LOST);
    if let Some(c) = CONNS.get_ptr_mut(st.cookie) {
        // SAFETY: map value pointer from a successful lookup.
        unsafe { (*c).info.flags |= conn_flag::H2_LOST };
    }
}
