//! watchdog's kernel programs.
//!
//! Seven thin entry points (see `programs/`; five per probe set) share the maps in `maps.rs`.
//! The hot path, every recv and send on every socket of the host, does one socket-local-storage
//! lookup and returns unless the socket is a tracked connection whose request state changes; a
//! request start on one copies its first bytes (`programs/head.rs`). Per request the kernel arms
//! at most one `bpf_timer`; only a request still in flight when it fires (or one whose caller
//! hangs up) produces an event for userspace.
#![no_std]
#![feature(asm_experimental_arch)]
#![no_main]

mod maps;
mod programs;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
