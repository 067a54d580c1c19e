//! Decoding kernel events: any byte string is refused or decoded to an event of a known kind and
//! this build's layout, whose bytes are exactly the input.
#![no_main]

use watchdog_common::{Event, EventKind, LAYOUT_VERSION};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(ev) = Event::decode(data) {
        assert_eq!(data.len(), core::mem::size_of::<Event>());
        assert!(EventKind::from_u32(ev.kind).is_some());
        assert_eq!(ev.version, LAYOUT_VERSION);
        // SAFETY: Event is plain old data.
        let bytes = unsafe {
            core::slice::from_raw_parts(
                (&ev as *const Event).cast::<u8>(),
                core::mem::size_of::<Event>(),
            )
        };
        assert_eq!(bytes, data);
    }
});
