//! What SIGINT (Ctrl-C) does to the kernel side. SIGTERM (systemd, the kubelet) keeps it pinned
//! for a seamless restart; Ctrl-C in a terminal means stop, so by default it detaches the
//! programs as `watchdog unload` does (`[daemon] on_interrupt`, `--on-interrupt`).

use std::path::Path;

use tracing::{error, info};

use crate::{config::OnInterrupt, loader};

/// Called once, on SIGINT, before the daemon exits. With `Unload`, the pinned state directory is
/// removed: the links held only by this process then detach when it exits a moment later.
pub fn on_interrupt(what: OnInterrupt, state_dir: &Path) {
    match what {
        OnInterrupt::Keep => info!(
            "SIGINT: exiting; the kernel side stays pinned for the next start (on_interrupt = \"keep\"; `watchdog unload` detaches it)"
        ),
        OnInterrupt::Unload => match loader::unload(state_dir) {
            Ok(_) => info!(
                state_dir = %state_dir.display(),
                "SIGINT: exiting and detaching the kernel programs (pinned state removed; SIGTERM or on_interrupt = \"keep\" would keep it)"
            ),
            Err(e) => error!(
                state_dir = %state_dir.display(),
                "SIGINT: could not remove the pinned state, the programs stay attached (`watchdog unload` detaches them): {e}"
            ),
        },
    }
}
