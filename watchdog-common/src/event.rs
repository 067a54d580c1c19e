//! Records the kernel sends to userspace through the `EVENTS` ring buffer.
//!
//! Only rare things travel this way: a request still in flight at its deadline, or a caller that
//! hung up on a request in flight. Normal requests never produce an event.

use core::mem::size_of;

use crate::{head::HEAD_BYTES, ConnInfo};

/// Why the kernel wrote an event.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The deadline timer fired and the request was still in flight.
    Deadline = 1,
    /// The peer sent FIN (connection went to CLOSE_WAIT) while the request was in flight.
    PeerFin = 2,
    /// The peer sent RST while the request was in flight.
    PeerReset = 3,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Deadline),
            2 => Some(Self::PeerFin),
            3 => Some(Self::PeerReset),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `EventKind` as u32.
    pub kind: u32,
    /// `LAYOUT_VERSION` of the writer.
    pub version: u32,
    /// `bpf_ktime_get_ns` when the event was written.
    pub ts_ns: u64,
    /// The connection and its request as the kernel saw them at that instant.
    pub conn: ConnInfo,
    /// The request's first bytes (`conn.head_len` of them).
    pub head: [u8; HEAD_BYTES],
}

impl Default for Event {
    fn default() -> Self {
        Self {
            kind: 0,
            version: 0,
            ts_ns: 0,
            conn: ConnInfo::default(),
            head: [0; HEAD_BYTES],
        }
    }
}

const _: () = assert!(size_of::<Event>() == 120 + HEAD_BYTES);

impl Event {
    /// Decodes a ring buffer record. Returns `None` for a record of the wrong size or kind.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != size_of::<Self>() {
            return None;
        }
        // SAFETY: length checked; Event is plain old data with no invalid bit patterns.
        let ev = unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) };
        EventKind::from_u32(ev.kind)?;
        (ev.version == crate::LAYOUT_VERSION).then_some(ev)
    }
}
