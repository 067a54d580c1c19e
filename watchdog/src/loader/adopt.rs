//! Connections open before their port was watched: the daemon runs the socket iterators
//! (`watchdog-ebpf/src/programs/adopt.rs`) by reading their pinned links to the end.

use std::{fs, io::Read};

use tracing::{error, info};

use super::{Kernel, LoadError};
use crate::kernel_btf;

impl Kernel {
    /// Adopts the established connections on watched ports (`run_iterators`) and logs how many;
    /// `why` names the occasion (start, a reload). A failure leaves them untracked, as before,
    /// and is logged.
    pub fn adopt_existing(&self, why: &str) {
        match self.run_iterators() {
            Ok(n) => info!(
                adopted = n,
                "{why}: adopted {n} established connections on watched ports (tracked from their next request)"
            ),
            Err(e) => error!(
                "{why}: the established connections on watched ports could not be adopted (only those accepted from now on are tracked): {:#}",
                anyhow::Error::from(e)
            ),
        }
    }

    /// Takes into tracking the established connections on watched ports (their own `PORTS`
    /// entry) that no program has seen accepted: runs the TCP socket iterator (and, for the
    /// syscall set, the task-file iterator that makes their holders owners) by reading its pinned
    /// link to the end. Only the daemon's network namespace is visited. Returns how many were
    /// adopted. An unpinned load (`watchdog check`) adopts nothing.
    fn run_iterators(&self) -> Result<u64, LoadError> {
        let Some(dir) = &self.state_dir else {
            return Ok(0);
        };
        let before = self.counters.stats().conns_adopted;
        let iterators = kernel_btf::PROGRAMS
            .iter()
            .filter(|p| kernel_btf::iter_target(p.hook).is_some())
            .filter(|p| p.set.is_none_or(|s| s == self.probe_set));
        for spec in iterators {
            let path = dir.join(format!("link_{}", spec.program));
            let run = fs::File::open(&path).and_then(|mut f| {
                let mut sink = Vec::new();
                f.read_to_end(&mut sink)
            });
            run.map_err(|source| LoadError::Pin { path, source })?;
        }
        Ok(self.counters.stats().conns_adopted.saturating_sub(before))
    }
}
