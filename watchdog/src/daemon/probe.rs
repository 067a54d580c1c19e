//! Reads of a target's /proc files and stacks, on helper threads: the acting thread never
//! waits on a target. Some of those files take the target's memory lock (`/proc/PID/cmdline`
//! for the diagnosis, `/proc/PID/maps` for the Python check), and a worker stuck in a page
//! fault on a stalled FUSE or NFS file while another of its threads waits to unmap holds that
//! lock for as long as the file server likes. The acting thread hands each read to a fixed
//! pool of threads (`start`), waits for the answer until `stack_timeout` past the batch's
//! start at most (`Pending::finish`), and acts without what did not arrive: the record says the
//! diagnosis timed out. A process whose earlier read has not come back is not read again
//! until it does (it would take a thread of the pool each time).
//!
//! The pool's queue is bounded; a read that finds it full is skipped (the record says why).
//! The helper threads share their queue's lock among themselves only; the acting thread talks
//! to them through channels.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, SyncSender},
        Mutex,
    },
    time::Instant,
};

use super::*;
use crate::stacks::{Captured, StackReport};

/// Helper threads: reads of stuck targets each hold one until their target answers; the rest
/// serve the others.
const THREADS: usize = 16;
/// Reads waiting for a helper thread; past that a read is skipped.
const QUEUE: usize = 256;
/// The least a diagnosis is given, even when its step is already `stack_timeout` late.
const DIAGNOSIS_MIN: Duration = Duration::from_millis(2);
/// How much sooner than the acting thread stops waiting the stack reads give up: the time
/// to hand their answer back (a stack that takes its whole limit still arrives, saying so).
const SLACK: Duration = Duration::from_millis(2);

/// What a helper thread is asked to read about one owner.
struct Job {
    pid: u32,
    tid: u32,
    cgroup: Option<String>,
    connections: Option<Vec<String>>,
    /// Whether the diagnosis is to be read (the acting thread's cache does not have it).
    diagnose: bool,
    /// The stacks, read within this limit of `queued` (`Err`: skipped, and why).
    stacks: Option<(Result<Duration, &'static str>, bool)>,
    queued: Instant,
    /// Past this the acting thread no longer waits: the job is dropped unread.
    give_up: Instant,
    reply: SyncSender<Probed>,
    done: Arc<AtomicBool>,
}

/// What comes back from a helper thread, each as soon as it is read: the diagnosis (cheap
/// unless the target blocks) does not wait for the stacks, which take up to their limit.
enum Probed {
    Diagnosis(Arc<diagnose::Diagnosis>),
    Stacks(Captured),
}

/// One step's reads as the acting thread takes them: the diagnosis (or why there is none) and
/// the stacks.
#[derive(Default)]
pub(super) struct Probe {
    /// When the batch's reads began.
    pub(super) started_ns: u64,
    pub(super) diagnosis: Option<Arc<diagnose::Diagnosis>>,
    pub(super) diagnosis_error: Option<String>,
    pub(super) captured: Captured,
}

/// Reads under way for one step.
pub(super) struct Pending {
    rx: Result<Receiver<Probed>, &'static str>,
    until: Instant,
    started_ns: u64,
    key: (u32, u32, u64),
    done: Option<Arc<AtomicBool>>,
    /// Whether the stacks were asked for: a Python owner (by its executable's name), native.
    stacks: Option<(bool, bool)>,
    cached: Option<Arc<diagnose::Diagnosis>>,
}

/// The helper pool and the processes whose reads have not come back.
#[derive(Default)]
pub(super) struct Probes {
    jobs: Option<SyncSender<Job>>,
    /// The daemon's niceness, taken by each helper thread: a thread started from the realtime
    /// acting thread would be reset to 0 (`SCHED_RESET_ON_FORK`) and wait behind busy workers
    /// (11 ms measured behind one spinning Python worker on two cores).
    nice: i32,
    /// Processes with a read that timed out and is still under way (its `done` flag).
    stuck: HashMap<u32, Arc<AtomicBool>>,
}

impl Probes {
    /// The pool, its threads started now (on the caller's thread, not the acting thread).
    pub(super) fn new(nice: i32) -> Self {
        let mut p = Self {
            nice,
            ..Self::default()
        };
        p.jobs();
        p
    }

    fn jobs(&mut self) -> Option<&SyncSender<Job>> {
        if self.jobs.is_none() {
            let nice = self.nice;
            let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..THREADS {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("watchdog-probe{i}"))
                    .spawn(move || {
                        set_nice(nice);
                        loop {
                            let job = match rx.lock() {
                                Ok(rx) => rx.recv(),
                                Err(_) => return,
                            };
                            let Ok(job) = job else { return };
                            run(job);
                        }
                    });
                if let Err(e) = spawned {
                    warn!(error = %e, "starting a diagnosis thread");
                    if i == 0 {
                        return None;
                    }
                    break;
                }
            }
            self.jobs = Some(tx);
        }
        self.jobs.as_ref()
    }

    /// Starts the reads for one owner: its diagnosis unless `cache` has it, and its stacks
    /// when `stacks` asks (`Err`: skipped, and why). `limit`: how long the reads may take.
    #[expect(
        clippy::too_many_arguments,
        reason = "one owner's reads, all asked at once"
    )]
    pub(super) fn start(
        &mut self,
        facts: &ProcessFacts,
        life: u64,
        cache: &diagnose::Cache,
        stacks: Option<(Result<Duration, &'static str>, bool)>,
        limit: Duration,
        now: Instant,
        python: bool,
    ) -> Pending {
        let (pid, tid) = (facts.pid, facts.tid);
        self.stuck.retain(|_, done| !done.load(Ordering::Acquire));
        let cached = cache.get(pid, tid, life);
        let until = now + limit.max(DIAGNOSIS_MIN);
        let mut p = Pending {
            rx: Err(""),
            until,
            started_ns: now_ns().saturating_sub(now.elapsed().as_nanos() as u64),
            key: (pid, tid, life),
            done: None,
            stacks: stacks.map(|(_, native)| (python, native)),
            cached: cached.clone(),
        };
        if cached.is_some() && stacks.is_none() {
            return p;
        }
        if self.stuck.contains_key(&pid) {
            p.rx = Err("skipped: an earlier read of this process has not come back");
            return p;
        }
        let done = Arc::new(AtomicBool::new(false));
        let (reply, rx) = mpsc::sync_channel(2);
        let job = Job {
            pid,
            tid,
            cgroup: (!facts.cgroup.is_empty()).then(|| facts.cgroup.clone()),
            connections: cache.connections_of(pid),
            diagnose: cached.is_none(),
            stacks: stacks
                .map(|(s, native)| (s.map(|l| l.min(limit).saturating_sub(SLACK)), native)),
            queued: now,
            give_up: until,
            reply,
            done: done.clone(),
        };
        let Some(jobs) = self.jobs() else {
            p.rx = Err("skipped: no diagnosis thread could be started");
            return p;
        };
        p.rx = match jobs.try_send(job) {
            Ok(()) => Ok(rx),
            Err(_) => Err("skipped: every diagnosis thread is busy"),
        };
        p.done = Some(done);
        p
    }

    /// What one owner's reads found by their time limit; the diagnosis is kept in `cache`.
    pub(super) fn finish(&mut self, p: Pending, cache: &mut diagnose::Cache) -> Probe {
        let mut diagnosis = p.cached.clone();
        let mut captured = None;
        let why = match &p.rx {
            Ok(rx) => loop {
                if diagnosis.is_some() && (p.stacks.is_none() || captured.is_some()) {
                    break None;
                }
                let left = p.until.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(Probed::Diagnosis(d)) => {
                        let (pid, tid, life) = p.key;
                        cache.remember(pid, tid, life, d.clone());
                        diagnosis = Some(d);
                    }
                    Ok(Probed::Stacks(c)) => captured = Some(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if let Some(done) = &p.done {
                            self.stuck.insert(p.key.0, done.clone());
                        }
                        break Some("timed out: the process did not answer within stack_timeout (its /proc files blocked)");
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        break Some("failed: the diagnosis thread ended")
                    }
                }
            },
            Err(why) => Some(*why),
        };
        let why = why.unwrap_or("not read");
        Probe {
            started_ns: p.started_ns,
            diagnosis_error: diagnosis.is_none().then(|| why.to_string()),
            diagnosis,
            captured: captured.unwrap_or_else(|| {
                p.stacks
                    .map(|(python, native)| without_stacks(python, native, why))
                    .unwrap_or_default()
            }),
        }
    }
}

/// The stack entries of a record whose reads did not come back (`why`).
fn without_stacks(python: bool, native: bool, why: &str) -> Captured {
    Captured {
        stack: python.then(|| StackReport {
            frames: Vec::new(),
            error: Some(why.to_string()),
            ms: 0.0,
        }),
        native: native.then(|| crate::native::NativeReport {
            frames: Vec::new(),
            error: Some(why.to_string()),
            stopped_ms: 0.0,
            ms: 0.0,
        }),
    }
}

/// Is the executable's name a Python interpreter's? From the facts the acting thread has
/// (`/proc/PID/exe`, which does not take the memory lock); the helper thread's own check also
/// looks for a loaded libpython.
pub(super) fn looks_python(facts: &ProcessFacts) -> bool {
    facts
        .exe
        .rsplit('/')
        .next()
        .is_some_and(|n| n.starts_with("python"))
}

/// On a helper thread: the reads of one job, unless the acting thread gave up on it already;
/// each answer is sent as soon as it is read.
fn run(job: Job) {
    if Instant::now() < job.give_up {
        if job.diagnose {
            let d = diagnose::read(job.pid, job.tid, job.cgroup, job.connections);
            let _ = job.reply.try_send(Probed::Diagnosis(Arc::new(d)));
        }
        let captured = match job.stacks {
            None => None,
            Some((Ok(limit), native)) => {
                let left = limit.saturating_sub(job.queued.elapsed());
                Some(crate::stacks::start(job.pid, job.tid, left, native).finish())
            }
            Some((Err(why), native)) => {
                Some(crate::stacks::Pending::skipped(job.pid, native, why).finish())
            }
        };
        if let Some(c) = captured {
            let _ = job.reply.try_send(Probed::Stacks(c));
        }
    }
    job.done.store(true, Ordering::Release);
}
