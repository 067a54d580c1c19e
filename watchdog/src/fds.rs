//! File descriptors for enforcement when the daemon's table is full: the soft limit is raised
//! to the hard one at start, and one descriptor is held in reserve, given back for the one
//! `pidfd_open` an action needs when the table is exhausted (a flood of connections to the
//! metrics port, or a leak), and taken again at the next housekeeping tick.

use std::{fs::File, io, sync::Mutex};

use tracing::{info, warn};

static RESERVE: Mutex<Option<File>> = Mutex::new(None);

/// Raises RLIMIT_NOFILE's soft limit to the hard one (systemd gives services 1024 soft) and
/// takes the reserve descriptor.
pub fn init() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct; no memory is shared.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && {
            let was = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 && was != lim.rlim_max
        }
    };
    if raised {
        info!(
            nofile = lim.rlim_cur,
            "raised the descriptor limit to its hard limit"
        );
    }
    refill();
}

/// Takes the reserve descriptor again if it was given back.
pub fn refill() {
    if let Ok(mut r) = RESERVE.lock() {
        if r.is_none() {
            *r = File::open("/dev/null").ok();
        }
    }
}

/// Runs `open`; if it fails because the descriptor table is full, gives the reserve back and
/// runs it once more.
pub fn with_reserve<T>(open: impl Fn() -> io::Result<T>) -> io::Result<T> {
    match open() {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
            let freed = RESERVE.lock().ok().and_then(|mut r| r.take()).is_some();
            warn!(
                freed,
                "descriptor table full: using the reserve descriptor for this action"
            );
            open()
        }
        r => r,
    }
}
