//! The action record: what the daemon remembers of each step, writes to the event stream and
//! logs, in one format; and the reporter thread that does the writing, so that no log line or
//! event write sits in front of an action (`acting.rs`).

use std::{
    sync::{atomic::AtomicUsize, mpsc, Mutex},
    thread::JoinHandle,
};

use prometheus_client::metrics::counter::Counter;

use super::*;

/// One action as remembered for `watchdog status` and written to the event stream.
#[derive(Clone, Debug, Serialize)]
pub struct ActionRecord {
    pub event: &'static str,
    pub policy: String,
    /// What was stopped: `GET /reports/2024`, a statement's first bytes (`None`: not readable).
    pub request: Option<String>,
    /// The route's pattern, `default` or `unknown`.
    pub route: String,
    /// The connection's protocol (`http1`, `http2`, `postgres`, ...).
    pub protocol: &'static str,
    pub reason: Reason,
    pub step: usize,
    pub action: String,
    pub target: crate::config::Target,
    pub result: &'static str,
    pub detail: Option<String>,
    /// `client` when the time was the client's (`blame.rs`): its connection was cut, or it was
    /// left alone while still sending; the worker was not signalled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blame: Option<&'static str>,
    pub port: u16,
    pub peer: String,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub elapsed_ms: u64,
    pub budget_ms: u64,
    pub lateness_ms: f64,
    /// Of a first step's lateness, the kernel's part: how long after the due instant its timer
    /// callback ran and emitted the event (softirq work can wait on a busy CPU). The rest is the
    /// daemon's: reading the event, deciding, acting. Absent for later steps, which the daemon
    /// times itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timer_ms: Option<f64>,
    /// Of the lateness, the time taken to capture the diagnosis before acting.
    pub diagnosis_ms: f64,
    pub mode: Mode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<Arc<diagnose::Diagnosis>>,
    /// Why there is no diagnosis: its read timed out (a target whose /proc files block) or
    /// was skipped (`probe.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnosis_error: Option<String>,
    /// The owner's Python stack, innermost first, and how long reading it took (`stacks.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: Option<crate::stacks::StackReport>,
    /// The owner's native frames, innermost first (`native.rs`), beside the kernel stack.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_stack: Option<crate::native::NativeReport>,
    /// Kubernetes names of the owner (`pods.rs`); absent outside a pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// The last actions, for `watchdog status`.
pub(super) type Recent = Arc<Mutex<VecDeque<ActionRecord>>>;

/// Records the reporter may hold, not yet written, before it drops (and counts) the rest:
/// an event stream nobody reads (`--events -` into a stalled pipe) must not grow memory.
pub(super) const MAX_QUEUED: usize = 4096;

/// The reporter thread's handle. Records are counted, logged and remembered in the order they
/// were sent, a batch of due steps at a time (one wake-up of this thread per batch); their
/// lines go to the event stream from a writer thread of their own, so a stream that blocks
/// holds up neither the metrics nor the acting thread. Both queues are bounded (`MAX_QUEUED`
/// records); what does not fit is dropped and counted (`watchdog_records_dropped_total`).
pub(super) struct Reporter {
    tx: Option<mpsc::SyncSender<Vec<step::KillDone>>>,
    /// Steps sent and not yet taken by the reporter thread.
    queued: Arc<AtomicUsize>,
    dropped: Counter,
    handle: Option<JoinHandle<()>>,
    pub(super) recent: Recent,
}

impl Reporter {
    pub(super) fn start(
        out: Option<Box<dyn Write + Send>>,
        mut accounting: step::Accounting,
        dropped: Counter,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Vec<step::KillDone>>(MAX_QUEUED);
        let lines = match out {
            Some(out) => Some(Writer::start(out, dropped.clone())?),
            None => None,
        };
        let recent: Recent = Arc::default();
        let keep = recent.clone();
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = queued.clone();
        let handle = std::thread::Builder::new()
            .name("watchdog-report".into())
            .spawn(move || {
                for done in rx {
                    taken.fetch_sub(done.len(), Ordering::Relaxed);
                    // Metrics first, then the lines: a record in the stream is counted already.
                    let batch: Vec<ActionRecord> = done
                        .into_iter()
                        .map(|(decided, outcome, at)| accounting.finish(decided, outcome, at))
                        .collect();
                    for record in &batch {
                        log_action(record);
                        if let Some(lines) = &lines {
                            lines.send(record);
                        }
                    }
                    let Ok(mut recent) = keep.lock() else {
                        continue;
                    };
                    for record in batch {
                        if recent.len() == RECENT_ACTIONS {
                            recent.pop_front();
                        }
                        recent.push_back(ActionRecord {
                            diagnosis: None,
                            ..record
                        });
                    }
                }
                if let Some(lines) = lines {
                    lines.finish();
                }
            })
            .context("starting the reporter thread")?;
        Ok(Self {
            tx: Some(tx),
            queued,
            dropped,
            handle: Some(handle),
            recent,
        })
    }

    /// Writes out what was sent and stops the thread.
    pub(super) fn finish(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The event stream's writer thread: one line per record, in order; at most `MAX_QUEUED`
/// lines waiting, the rest dropped and counted.
struct Writer {
    tx: mpsc::SyncSender<Vec<u8>>,
    dropped: Counter,
    handle: JoinHandle<()>,
}

impl Writer {
    fn start(mut out: Box<dyn Write + Send>, dropped: Counter) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(MAX_QUEUED);
        let handle = std::thread::Builder::new()
            .name("watchdog-events".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    // One write per line, newline included: a reader of the stream never sees
                    // part of a record (a batch in one write, 300 KB, it did).
                    let _ = out.write_all(&line);
                    while let Ok(line) = rx.try_recv() {
                        let _ = out.write_all(&line);
                    }
                    let _ = out.flush();
                }
            })
            .context("starting the event stream's writer thread")?;
        Ok(Self {
            tx,
            dropped,
            handle,
        })
    }

    fn send(&self, record: &ActionRecord) {
        let mut line = Vec::with_capacity(1024);
        if serde_json::to_writer(&mut line, record).is_err() {
            return;
        }
        line.push(b'\n');
        if self.tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }

    /// Writes out what is queued, unless the stream is stuck: then what is left is dropped.
    fn finish(self) {
        drop(self.tx);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !self.handle.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.handle.is_finished() {
            let _ = self.handle.join();
        }
    }
}

impl State {
    /// Hands a batch of carried-out steps to the reporter thread: it counts them (metrics),
    /// makes their records, logs them, writes them to the event stream and remembers them for
    /// `watchdog status`. Never waits: past `MAX_QUEUED` steps waiting, the batch is dropped
    /// and counted.
    pub(super) fn report(&mut self, steps: Vec<step::KillDone>) {
        let r = &self.reporter;
        let (Some(tx), false) = (&r.tx, steps.is_empty()) else {
            return;
        };
        let n = steps.len();
        if r.queued.load(Ordering::Relaxed) + n > MAX_QUEUED {
            r.dropped.inc_by(n as u64);
            return;
        }
        r.queued.fetch_add(n, Ordering::Relaxed);
        if tx.try_send(steps).is_err() {
            r.queued.fetch_sub(n, Ordering::Relaxed);
            r.dropped.inc_by(n as u64);
        }
    }
}

fn log_action(r: &ActionRecord) {
    let d = r.diagnosis.as_ref();
    // Reads the way Baseplate's does: `GET /reports/2024 on :8080 over its 60s budget`.
    let what = r.request.as_deref().unwrap_or("request");
    let budget = humantime::format_duration(Duration::from_millis(r.budget_ms));
    let (kind, msg) = match r.reason {
        Reason::Budget => (
            "request over budget",
            format!("{what} on :{} over its {budget} budget", r.port),
        ),
        Reason::ClientGone => (
            "request abandoned by its client",
            format!("{what} on :{} abandoned by its client", r.port),
        ),
    };
    macro_rules! emit {
        ($lvl:ident) => {
            $lvl!(
                kind, policy = %r.policy, route = %r.route, request = r.request.as_deref().unwrap_or(""), protocol = r.protocol,
                reason = r.reason.label(), port = r.port, peer = %r.peer, pid = r.pid, tid = r.tid,
                comm = %r.comm, elapsed_ms = r.elapsed_ms, budget_ms = r.budget_ms, step = r.step,
                action = %r.action, target = ?r.target, result = r.result, detail = r.detail.as_deref().unwrap_or(""),
                blame = r.blame.unwrap_or("server"),
                lateness_ms = r.lateness_ms, mode = ?r.mode,
                namespace = r.namespace.as_deref().unwrap_or(""), pod = r.pod.as_deref().unwrap_or(""),
                container = r.container.as_deref().unwrap_or(""),
                thread_state = d.map_or("", |d| d.thread_state.as_str()),
                syscall = d.map_or("", |d| d.syscall.as_str()),
                waiting_on = d.and_then(|d| d.waiting_on.as_deref()).unwrap_or(""),
                wchan = d.map_or("", |d| d.wchan.as_str()),
                cgroup = d.map_or("", |d| d.cgroup.as_str()),
                container_id = d.and_then(|d| d.container_id.as_deref()).unwrap_or(""),
                cmdline = d.map_or("", |d| d.cmdline.as_str()),
                connections = ?d.map(|d| &d.connections),
                kernel_stack = ?d.map(|d| &d.kernel_stack),
                stack = r.stack.as_ref().map(|s| s.compact(4)).unwrap_or_default(),
                stack_ms = r.stack.as_ref().map_or(0.0, |s| s.ms),
                native_stack = r.native_stack.as_ref().map(|s| s.compact(4)).unwrap_or_default(),
                native_stack_ms = r.native_stack.as_ref().map_or(0.0, |s| s.ms),
                native_stopped_ms = r.native_stack.as_ref().map_or(0.0, |s| s.stopped_ms),
                "{msg}"
            )
        };
    }
    match r.result {
        "refused" | "failed" => emit!(warn),
        "ended" => emit!(debug),
        _ => emit!(warn),
    }
}

/// The event stream (`--events PATH`, `-` for stdout).
pub(super) fn open_events(path: &Option<PathBuf>) -> anyhow::Result<Option<Box<dyn Write + Send>>> {
    Ok(match path {
        None => None,
        Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::stdout())),
        Some(p) => {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            // It holds request paths, SQL text and command lines of other users' processes:
            // created 0600, and never through a symlink (one planted at the path would point
            // the daemon's writes wherever its owner likes).
            let file = File::options()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(p)
                .map_err(|e| {
                    if e.raw_os_error() == Some(libc::ELOOP) {
                        anyhow::anyhow!(
                            "{} is a symbolic link: refusing to write events through it",
                            p.display()
                        )
                    } else {
                        anyhow::Error::new(e).context(format!("opening {}", p.display()))
                    }
                })?;
            let meta = file
                .metadata()
                .with_context(|| format!("reading {}", p.display()))?;
            // A regular file, or a pipe a collector reads (`mkfifo`): nothing else.
            use std::os::unix::fs::FileTypeExt;
            anyhow::ensure!(
                meta.is_file() || meta.file_type().is_fifo(),
                "{} is neither a regular file nor a FIFO: refusing to write events to it",
                p.display()
            );
            // One another user made (and can read) is not ours to fill.
            let euid = nix::unistd::geteuid().as_raw();
            anyhow::ensure!(
                meta.uid() == euid,
                "{} is owned by uid {}, not this daemon's ({euid}): refusing to write events to it",
                p.display(),
                meta.uid()
            );
            // A file that was there already keeps its mode unless we tighten it.
            if meta.mode() & 0o077 != 0 {
                file.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("making {} private (0600)", p.display()))?;
            }
            Some(Box::new(file))
        }
    })
}
