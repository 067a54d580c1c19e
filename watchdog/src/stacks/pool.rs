//! The threads that read stacks: a fixed few fed by a bounded queue, so that what a traced
//! process does to a read (hang it in a FUSE read, hold it in a ptrace stop) costs a bounded
//! number of threads in total, never one per action.
//!
//! A read its caller stopped waiting for is abandoned: still queued, it is skipped; already
//! running, its worker is counted lost and a replacement starts, but only while the pool has
//! fewer than [`MAX_THREADS`] threads alive. A lost worker that comes back rejoins if the pool
//! is short of [`WORKERS`], else ends. A full queue refuses at once: the caller (the acting
//! thread) never waits to hand a read over.

use std::{
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicU8, Ordering},
        mpsc, Arc, Mutex, OnceLock,
    },
    time::Instant,
};

/// The workers reading at once.
pub const WORKERS: usize = 4;
/// The most reader threads alive at once, lost ones included: a wedged target costs at most
/// `MAX_THREADS - WORKERS` threads beyond the pool.
pub const MAX_THREADS: usize = 8;
/// Reads waiting for a worker.
const QUEUE: usize = 16;

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;
/// Abandoned while queued: skipped.
const ABANDONED: u8 = 3;
/// Abandoned while running: its worker is lost.
const LOST: u8 = 4;

struct Job {
    state: Arc<AtomicU8>,
    run: Box<dyn FnOnce() + Send>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Reader threads alive (lost ones included).
    pub threads: usize,
    /// Of them, the ones taking reads.
    pub working: usize,
}

struct Pool {
    tx: mpsc::SyncSender<Job>,
    rx: Mutex<mpsc::Receiver<Job>>,
    counts: Mutex<Counts>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    let mut fresh = false;
    let p = POOL.get_or_init(|| {
        fresh = true;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        Pool {
            tx,
            rx: Mutex::new(rx),
            counts: Mutex::new(Counts::default()),
        }
    });
    if fresh {
        for _ in 0..WORKERS {
            p.add_worker();
        }
    }
    p
}

/// The pool's threads now.
#[cfg(test)]
fn counts() -> Counts {
    pool().counts.lock().map(|c| *c).unwrap_or_default()
}

impl Pool {
    /// Starts a worker if the pool is under `MAX_THREADS`.
    fn add_worker(&'static self) {
        let Ok(mut c) = self.counts.lock() else {
            return;
        };
        if c.threads >= MAX_THREADS {
            return;
        }
        let started = std::thread::Builder::new()
            .name("watchdog-stack".into())
            .spawn(move || self.work());
        if started.is_ok() {
            c.threads += 1;
            c.working += 1;
        }
    }

    fn work(&'static self) {
        loop {
            let job = match self.rx.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            let Ok(job) = job else { return };
            if job
                .state
                .compare_exchange(QUEUED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            let _ = std::panic::catch_unwind(AssertUnwindSafe(job.run));
            let lost = job
                .state
                .compare_exchange(RUNNING, DONE, Ordering::AcqRel, Ordering::Acquire)
                .is_err();
            let must_end = crate::native::must_end_to_detach();
            let Ok(mut c) = self.counts.lock() else {
                return;
            };
            if lost {
                // `abandon` counted this worker out already.
                if c.working < WORKERS && !must_end {
                    c.working += 1;
                    continue;
                }
                c.threads -= 1;
                drop(c);
                if must_end {
                    self.add_worker_if_short();
                }
                return;
            }
            if must_end {
                c.threads -= 1;
                c.working -= 1;
                drop(c);
                self.add_worker();
                return;
            }
        }
    }

    fn add_worker_if_short(&'static self) {
        if self.counts.lock().is_ok_and(|c| c.working < WORKERS) {
            self.add_worker();
        }
    }
}

/// A read handed to the pool; its answer comes through `wait_until`.
pub struct Ticket<T> {
    rx: mpsc::Receiver<T>,
    state: Arc<AtomicU8>,
}

/// Hands `f` to a worker, or says why it cannot (every worker busy and the queue full).
pub fn submit<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<Ticket<T>, String> {
    let (tx, rx) = mpsc::channel();
    let state = Arc::new(AtomicU8::new(QUEUED));
    let job = Job {
        state: state.clone(),
        run: Box::new(move || {
            let _ = tx.send(f());
        }),
    };
    pool()
        .tx
        .try_send(job)
        .map_err(|_| "skipped: every stack reader is busy".to_string())?;
    Ok(Ticket { rx, state })
}

impl<T> Ticket<T> {
    /// The answer if it comes by `deadline`; else the read is abandoned (`what` says how long
    /// it had).
    pub fn wait_until(self, deadline: Instant, what: &str) -> Result<T, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(v) => Ok(v),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("the reader failed".into()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.abandon();
                // It may have answered in between.
                self.rx.try_recv().map_err(|_| what.to_string())
            }
        }
    }

    fn abandon(&self) {
        let s = &self.state;
        if s.compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return;
        }
        if s.compare_exchange(RUNNING, LOST, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let p = pool();
            if let Ok(mut c) = p.counts.lock() {
                c.working -= 1;
            }
            p.add_worker();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Reads that never end cost at most `MAX_THREADS` threads; reads after them are refused
    /// at once or abandoned at their deadline, never waited for past it; once the hung reads
    /// come back the pool takes reads again.
    #[test]
    fn hung_reads_cost_a_bounded_number_of_threads() {
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let mut refused = 0;
        for _ in 0..40 {
            let g = gate.clone();
            let t = Instant::now();
            match submit(move || {
                let _ = g.lock().map(|g| g.recv_timeout(Duration::from_secs(20)));
            }) {
                Ok(ticket) => {
                    let r = ticket.wait_until(t + Duration::from_millis(20), "timed out");
                    assert!(r.is_err());
                }
                Err(_) => refused += 1,
            }
            assert!(
                t.elapsed() < Duration::from_millis(200),
                "{:?}",
                t.elapsed()
            );
            let c = counts();
            assert!(c.threads <= MAX_THREADS, "{c:?}");
        }
        assert!(refused > 0, "the queue filled and refused");
        // Let the hung reads finish: the pool works again.
        for _ in 0..MAX_THREADS {
            let _ = release.send(());
        }
        drop(release);
        let until = Instant::now() + Duration::from_secs(5);
        let answer = loop {
            if let Ok(t) = submit(|| 7) {
                if let Ok(v) = t.wait_until(Instant::now() + Duration::from_millis(500), "t") {
                    break Some(v);
                }
            }
            if Instant::now() > until {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(answer, Some(7));
        let c = counts();
        assert!(c.threads <= MAX_THREADS && c.working <= WORKERS, "{c:?}");
    }
}
