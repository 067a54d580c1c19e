//! One batch of due ladder steps: the diagnosis, the enforcement chain (`decide.rs`), the
//! action; then, once every step of the batch has acted, their metrics and records, made on
//! the reporter thread (`Accounting`, `record.rs`). A
//! `kill_query` step runs on a thread of its own (`mysql.rs`); its record is made when that
//! thread reports back (`State::kill_done`).

use super::*;
use crate::{config::Target, policy::Refusal};

/// A step that was decided: what its metrics and record need once its outcome is known.
pub(super) struct Decided {
    due: Due,
    facts: Arc<ProcessFacts>,
    diagnosis: Option<Arc<diagnose::Diagnosis>>,
    stack: Option<crate::stacks::StackReport>,
    native_stack: Option<crate::native::NativeReport>,
    mode: Mode,
    /// When the step was taken up, and when its diagnosis was done.
    started: u64,
    diagnosed: u64,
    /// The statement as the database server showed it (`kill_query`), for a request whose own
    /// bytes did not say.
    statement: Option<String>,
    /// `client` when the time was the client's (`blame.rs`).
    blame: Option<&'static str>,
    /// Why the diagnosis is missing (its read timed out or was skipped: `probe.rs`).
    diagnosis_error: Option<String>,
}

/// A step's subject, pinned (`State::subject`): the pin, its facts read after the pin, and
/// what the guard, `[protect]` and the step's policy say about them.
type Subject = (actions::Pin, Arc<ProcessFacts>, Result<(), Refusal>);

/// A `kill_query` step carried out on its thread: the step, its outcome, when it was done.
pub(super) type KillDone = (Decided, Outcome, u64);

/// One `kill_query` step for a worker thread.
struct KillJob {
    decided: Decided,
    account: crate::config::MysqlAccount,
}

/// Steps waiting for a free `kill_query` thread; beyond them a step fails (`failed`) at once.
const KILL_QUEUE: usize = 16;

/// The `kill_query` threads (`mysql::MAX_IN_FLIGHT`, started with the first such step): how
/// they re-read the kernel and report back.
pub(super) struct KillQueries {
    reader: Arc<crate::loader::ConnsReader>,
    done: mpsc::UnboundedSender<KillDone>,
    jobs: Option<std::sync::mpsc::SyncSender<KillJob>>,
}

impl KillQueries {
    pub(super) fn new(
        reader: Arc<crate::loader::ConnsReader>,
        done: mpsc::UnboundedSender<KillDone>,
    ) -> Self {
        Self {
            reader,
            done,
            jobs: None,
        }
    }

    /// The queue of the worker threads, started on first use.
    fn jobs(&mut self) -> std::io::Result<&std::sync::mpsc::SyncSender<KillJob>> {
        if self.jobs.is_none() {
            let (tx, rx) = std::sync::mpsc::sync_channel::<KillJob>(KILL_QUEUE);
            let rx = Arc::new(std::sync::Mutex::new(rx));
            for i in 0..crate::mysql::MAX_IN_FLIGHT {
                let (rx, reader, done) = (rx.clone(), self.reader.clone(), self.done.clone());
                std::thread::Builder::new()
                    .name(format!("kill_query{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let _ = done.send(kill_one(job, &reader));
                    })?;
            }
            self.jobs = Some(tx);
        }
        Ok(self.jobs.as_ref().expect("set above"))
    }
}

/// Runs one `kill_query` step (on a worker thread).
fn kill_one(job: KillJob, reader: &crate::loader::ConnsReader) -> KillDone {
    let c = job.decided.due.conn;
    let peer = (
        std::net::IpAddr::from(Ipv6Addr::from(c.remote_addr)),
        c.remote_port,
    );
    // The same request, still in flight on this connection, in the kernel's table.
    let current = || {
        reader
            .get(c.cookie)
            .is_some_and(|r| r.info.gen == c.gen && r.info.state == ReqState::InFlight as u32)
    };
    let report = crate::mysql::kill_query(&job.account, peer, &current);
    let decided = Decided {
        statement: report.statement.as_deref().map(request::sql_text),
        ..job.decided
    };
    (decided, report.outcome, now_ns())
}

impl State {
    pub(super) fn run_due(&mut self) {
        // Thread states read once per thread for a few batches (5 ms); connection lists at
        // most once a second per process.
        let mut cache = std::mem::take(&mut self.diagnoses);
        cache.next_batch();
        let mut facts = std::mem::take(&mut self.facts);
        // Act on the whole batch first and account after: a deadline late in a batch does not
        // wait for the metrics, records and log lines of the ones before it, and the next
        // batch does not either (they are the reporter thread's).
        let mut done = Vec::new();
        let t0 = now_ns();
        let batch = self
            .tracker
            .pop_due_at_most(now_ns(), super::acting::MAX_STEPS_PER_WAKE);
        // The owners' stacks, before their first action: every read of the batch starts now,
        // side by side, so the batch waits for them together, not one after the other. A read
        // may take until `stack_timeout` past its deadline, no longer: a batch that starts late
        // (behind the reads of the one before) gives its reads what is left of that. At most
        // `STACKS_PER_BATCH` of them: the rest act at once and their records say why they
        // have no stack.
        //
        // Only for an owner the guard and `[protect]` allow, judged on the pinned process
        // (`subject`), and only when the thread read is still the request's owner (pinned and
        // checked as a thread target is): a protected process is never stopped or read.
        let start_ns = now_ns();
        let started = std::time::Instant::now();
        let mut reads = 0;
        let mut pending: Vec<Option<super::probe::Pending>> = Vec::with_capacity(batch.len());
        for due in &batch {
            // The first step of a ladder whose request is still current, of a subject the
            // safety rules let be acted on, whose owner thread still pins and checks out: its
            // diagnosis, and its stacks if asked for, on the probe pool (`probe.rs`).
            let wanted = due.index == 0
                && Self::still_valid(&self.kernel, due.key, &due.conn)
                && matches!(self.subject(due, &facts), Ok((_, _, Ok(()))))
                && actions::pin(&mut self.pidfds, Target::Thread, &due.conn).is_ok();
            let owner = wanted
                .then(|| facts.get(due.conn.tgid, due.conn.tid))
                .flatten();
            let Some(f) = owner else {
                pending.push(None);
                continue;
            };
            let late = Duration::from_nanos(start_ns.saturating_sub(due.due_ns));
            let limit = self.cfg.stack_timeout.saturating_sub(late);
            let native = self.cfg.native_stacks;
            let stacks = (self.cfg.stacks && due.policy.stacks).then(|| {
                reads += 1;
                let read = if reads > STACKS_PER_BATCH {
                    Err("skipped: this batch reads no more stacks")
                } else if limit.is_zero() {
                    Err("skipped: the action is already stack_timeout past its deadline")
                } else {
                    Ok(limit)
                };
                (read, native)
            });
            let python = super::probe::looks_python(&f);
            pending.push(Some(self.probes.start(
                &f,
                due.conn.owner_life,
                &cache,
                stacks,
                limit,
                started,
                python,
            )));
        }
        for (due, read) in batch.into_iter().zip(pending) {
            let probe = read.map(|p| self.probes.finish(p, &mut cache));
            let Some((outcome, decided, at)) = self.run_step(&due, probe, &mut facts) else {
                continue;
            };
            if matches!(
                outcome,
                Outcome::Ended | Outcome::TargetGone | Outcome::Refused(_)
            ) {
                self.tracker.finish(due.key);
            }
            done.push((decided, outcome, at));
        }
        self.diagnoses = cache;
        self.facts = facts;
        self.pidfds.clear();
        let t1 = now_ns();
        let n = done.len();
        self.report(done);
        if n >= BURST_LOG {
            info!(
                steps = n,
                acting_ms = t1.saturating_sub(t0) as f64 / 1e6,
                handoff_ms = now_ns().saturating_sub(t1) as f64 / 1e6,
                "burst of due steps: all acted on, then handed to the reporter thread (metrics, records)"
            );
        }
    }

    /// A `kill_query` thread reported back: its metrics and record. The ladder goes on either
    /// way; a later step finds the request ended if the kill worked.
    pub(super) fn kill_done(&mut self, (decided, outcome, done): KillDone) {
        self.report(vec![(decided, outcome, done)]);
    }

    /// Hands a `kill_query` step to a worker thread; its outcome comes back through
    /// `KillQueries::done`. An error gives the step back with the outcome that kept it from
    /// starting.
    fn start_kill_query(&mut self, decided: Decided) -> Result<(), Box<(Decided, Outcome)>> {
        let Some(account) = decided.due.policy.mysql.clone() else {
            let why = Outcome::Failed("the policy has no `mysql` account".into());
            return Err(Box::new((decided, why)));
        };
        let jobs = match self.kills.jobs() {
            Ok(j) => j,
            Err(e) => {
                let why = Outcome::Failed(format!("starting the kill_query threads: {e}"));
                return Err(Box::new((decided, why)));
            }
        };
        jobs.try_send(KillJob { decided, account }).map_err(|e| {
            let why = |what: &str| Outcome::Failed(format!("kill_query threads {what}"));
            Box::new(match e {
                std::sync::mpsc::TrySendError::Full(j) => (
                    j.decided,
                    why(&format!("busy: {KILL_QUEUE} steps already waiting")),
                ),
                std::sync::mpsc::TrySendError::Disconnected(j) => (j.decided, why("gone")),
            })
        })
    }

    /// Is the request this ladder is about still what it was, in the kernel, right now?
    fn still_valid(kernel: &Kernel, key: Key, c: &ConnInfo) -> bool {
        let now = kernel.current(c);
        // A stream that is gone from the kernel's table was answered or reset, or its
        // connection closed: never acted on.
        if c.flags & watchdog_common::conn_flag::STREAM != 0 && now.is_none() {
            return false;
        }
        tracker::still_current(key.reason, c, kernel.task(c.tid).as_ref(), now.as_ref())
    }

    /// The process a step is about, pinned before anything is read about it: a signal's target
    /// (thread or process), for any other action the owner's process. Checked to be the
    /// request's owner through the pinned task (`actions::pin`); its facts read after the pin,
    /// once per batch; the guard, `[protect]` and the step's policy judged on them.
    fn subject(&mut self, due: &Due, facts: &process::FactsCache) -> Result<Subject, Outcome> {
        let target = match due.step.action {
            Action::Signal(_) => due.step.target,
            _ => Target::Process,
        };
        let mut pin = actions::pin(&mut self.pidfds, target, &due.conn)?;
        let Some(f) = actions::pinned_facts(&mut self.pidfds, &mut pin, |p, t| facts.read(p, t))
        else {
            return Err(Outcome::TargetGone);
        };
        let guard = policy::guard_target(&f, &self.cfg.protect, self.own_pid, &due.policy.selector);
        Ok((pin, f, guard))
    }

    /// Whose time it is, read right before the step (`blame.rs`), and whether the kernel
    /// restarted the request's clock since its event (its head came in whole since: a new
    /// deadline event follows). HTTP/2 streams are not judged: acted on as before.
    fn blame_of(&self, due: &Due, now: u64) -> (crate::blame::Blame, bool) {
        let c = &due.conn;
        if c.flags & watchdog_common::conn_flag::STREAM != 0
            || matches!(due.step.action, Action::Log)
        {
            return (crate::blame::Blame::Unknown, false);
        }
        let current = self.kernel.current(c);
        let restarted = current.is_some_and(|k| k.gen == c.gen && k.start_ns != c.start_ns);
        let facts = crate::blame::Facts {
            bodyless: crate::blame::bodyless(due.about.request.as_deref()),
            ..crate::blame::facts(c, current.as_ref(), now)
        };
        let stall = crate::blame::stall_after(due.about.budget);
        (crate::blame::blame(&facts, stall), restarted)
    }

    /// Takes one step of a ladder: its subject pinned and guarded, then diagnosis (first step
    /// only, and only of a subject the guard allows), the safety checks, the action.
    fn run_step(
        &mut self,
        due: &Due,
        probe: Option<super::probe::Probe>,
        facts: &mut process::FactsCache,
    ) -> Option<(Outcome, Decided, u64)> {
        let c = due.conn;
        let policy = &due.policy;
        let now = now_ns();
        let owner = facts.get(c.tgid, c.tid).unwrap_or_else(|| {
            Arc::new(ProcessFacts {
                pid: c.tgid,
                tid: c.tid,
                ..Default::default()
            })
        });
        let subject = self.subject(due, facts);
        let kernel = &self.kernel;
        let valid = || Self::still_valid(kernel, due.key, &c);
        // Read once, after the pin, for the diagnosis and the chain (again after a stack read,
        // which takes time, or a diagnosis); the signal goes on this reading when nothing slow
        // came between.
        let current = valid();
        let (pin, facts, guard) = match subject {
            Ok(pinned) => pinned,
            // Not pinned (gone, or not the owner): nothing is read about it, nothing is sent.
            Err(outcome) => {
                let outcome = if current { outcome } else { Outcome::Ended };
                let decided = Decided {
                    due: due.clone(),
                    facts: owner,
                    diagnosis: None,
                    stack: None,
                    native_stack: None,
                    mode: self.cfg.mode_of(policy),
                    started: now,
                    diagnosed: now,
                    statement: None,
                    blame: None,
                    diagnosis_error: None,
                };
                return Some((outcome, decided, now_ns()));
            }
        };
        // The diagnosis and stacks were read before, on helper threads (`probe.rs`), only for a
        // subject the guard allowed.
        let probe = probe.filter(|_| due.index == 0 && current && guard.is_ok());
        let probed_from = probe.as_ref().map(|p| p.started_ns);
        let (diagnosis, diagnosis_error, captured) = match probe {
            Some(p) => (p.diagnosis, p.diagnosis_error, p.captured),
            None => (None, None, Default::default()),
        };
        let (stack, native_stack) = (captured.stack, captured.native);
        // Nothing slow runs between the reading above and the signal but a worker count.
        let quick = policy.min_workers.is_none();
        let diagnosed = now_ns();
        let mode = self.cfg.mode_of(policy);
        let workers = &self.workers;
        let alive = || workers.count(&policy.name, &policy.selector);
        // One breaker per policy and workload: another tenant's trips never silence this one.
        let (blame, restarted) = self.blame_of(due, now);
        let breaker_key = crate::breakers::Key {
            policy: policy.name.clone(),
            workload: crate::breakers::Workload::of(&facts, || crate::breakers::start_time(c.tgid)),
        };
        let verdict = decide::decide(
            decide::Inputs {
                action: due.step.action,
                mode,
                still_current: current && !restarted,
                guard,
                floor: policy
                    .min_workers
                    .map(|k| (k, &alive as &dyn Fn() -> usize)),
                breaker: &policy.breaker,
                now_ns: now,
                blame,
            },
            self.breakers.get(&breaker_key, now),
        );
        let mut decided = Decided {
            due: due.clone(),
            facts,
            diagnosis,
            stack,
            native_stack,
            mode,
            started: probed_from.unwrap_or(now),
            diagnosed,
            statement: None,
            blame: blame.label(),
            diagnosis_error,
        };
        let outcome = match verdict {
            Verdict::Ended => Outcome::Ended,
            Verdict::Refused(r) => Outcome::Refused(r.label()),
            Verdict::Logged => Outcome::Delivered,
            Verdict::Observed => Outcome::Observed,
            Verdict::ClientSending => Outcome::Refused("client still sending"),
            Verdict::CutClient => {
                let l = PolicyLabels {
                    policy: policy.name.clone(),
                };
                self.metrics.client_timeouts.get_or_create(&l).inc();
                actions::reset(&c, valid)
            }
            Verdict::Act => match due.step.action {
                // Pinned and checked before `current` was read: when nothing slow came
                // between, that reading is the check after the pin.
                Action::Signal(sig) => {
                    actions::send(&mut self.pidfds, pin, sig.0, || quick || valid())
                }
                Action::Reset => actions::reset(&c, valid),
                Action::Log => Outcome::Delivered,
                Action::KillQuery => match self.start_kill_query(decided) {
                    Ok(()) => {
                        self.workers.forget(&policy.name);
                        return None;
                    }
                    Err(back) => {
                        let why;
                        (decided, why) = *back;
                        why
                    }
                },
            },
            Verdict::Tripped => {
                error!(
                    policy = %policy.name,
                    workload = %breaker_key.workload.describe(),
                    max_actions = policy.breaker.max_actions,
                    window = %humantime::format_duration(policy.breaker.window),
                    cooldown = %humantime::format_duration(policy.breaker.cooldown),
                    "CIRCUIT BREAKER OPEN: too many actions; policy drops to observe-only for this workload for the cool-down"
                );
                let l = PolicyLabels {
                    policy: policy.name.clone(),
                };
                self.metrics.breaker_trips.get_or_create(&l).inc();
                self.metrics.observe_only.get_or_create(&l).set(1);
                Outcome::Observed
            }
        };
        if verdict == Verdict::Act {
            self.workers.forget(&policy.name);
        }
        Some((outcome, decided, now_ns()))
    }
}

/// What a step's accounting updates: the action counters and the lateness histogram (handles
/// on the daemon's metrics) and the namespaces that keep a label of their own. The reporter
/// thread owns it (`record.rs`): a burst's accounting runs beside its actions, not in front
/// of the next batch's.
pub(super) struct Accounting {
    actions: prometheus_client::metrics::family::Family<
        ActionLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    lateness: prometheus_client::metrics::histogram::Histogram,
    namespaces: crate::pods::NamespaceLabels,
}

impl Accounting {
    /// Handles on `metrics`' action counters and lateness; the namespace labels move here.
    pub(super) fn of(metrics: &mut Metrics) -> Self {
        Self {
            actions: metrics.actions.clone(),
            lateness: metrics.lateness.clone(),
            namespaces: std::mem::take(&mut metrics.namespaces),
        }
    }

    /// A step's metrics and record, once its outcome is known (`done`: when it was).
    pub(super) fn finish(&mut self, d: Decided, outcome: Outcome, done: u64) -> ActionRecord {
        let Decided {
            due,
            facts,
            diagnosis,
            stack,
            native_stack,
            mode,
            started: now,
            diagnosed,
            statement,
            blame,
            diagnosis_error,
        } = d;
        let c = due.conn;
        let policy = &due.policy;
        let lateness = done.saturating_sub(due.due_ns);
        if matches!(
            outcome,
            Outcome::Delivered | Outcome::ShutDown | Outcome::Killed(_)
        ) {
            self.lateness.observe(lateness as f64 / 1e9);
        }
        // The client's time: the worker was not touched; a stalled client's connection was cut.
        let action = match blame {
            Some(_) => Action::Reset.label(),
            None => due.step.action.label(),
        };
        self.actions
            .get_or_create(&ActionLabels {
                policy: policy.name.clone(),
                route: due.about.route.clone(),
                action: action.clone(),
                result: outcome.label().into(),
                reason: due.key.reason.label().into(),
                namespace: self
                    .namespaces
                    .label(facts.pod.as_ref().map(|n| n.namespace.as_str())),
            })
            .inc();
        ActionRecord {
            event: "action",
            policy: policy.name.clone(),
            request: due.about.request.clone().or(statement),
            route: due.about.route.clone(),
            protocol: due.about.protocol,
            reason: due.key.reason,
            step: due.index,
            action,
            target: due.step.target,
            result: outcome.label(),
            detail: outcome.detail(),
            blame,
            port: c.local_port,
            peer: peer_of(&c),
            pid: c.tgid,
            tid: c.tid,
            comm: facts.comm.clone(),
            elapsed_ms: done.saturating_sub(c.start_ns) / 1_000_000,
            budget_ms: due.about.budget.as_millis() as u64,
            lateness_ms: lateness as f64 / 1e6,
            timer_ms: (due.index == 0)
                .then(|| due.about.event_ns.saturating_sub(due.due_ns) as f64 / 1e6),
            diagnosis_ms: diagnosed.saturating_sub(now) as f64 / 1e6,
            mode,
            diagnosis,
            diagnosis_error,
            stack,
            native_stack,
            namespace: facts.pod.as_ref().map(|n| n.namespace.clone()),
            pod: facts.pod.as_ref().map(|n| n.pod.clone()),
            container: facts.pod.as_ref().and_then(|n| n.container.clone()),
        }
    }
}

/// A batch of at least this many steps logs how long acting and accounting took.
const BURST_LOG: usize = 64;

/// The most owners whose stacks one batch reads (a burst of deadlines must not start a
/// thousand readers); they are read side by side, so the batch waits at most `stack_timeout`.
const STACKS_PER_BATCH: usize = 8;
