//! The one clock of the daemon: CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`, so kernel
//! times and the daemon's compare directly.

/// CLOCK_MONOTONIC in nanoseconds.
pub fn now_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// CLOCK_MONOTONIC in whole seconds (health probes).
pub fn mono_secs() -> u64 {
    now_ns() / 1_000_000_000
}
