//! One batch of due ladder steps: the diagnosis, the enforcement chain (`decide.rs`), the
//! action; then, once every step of the batch has acted, their metrics and records.

use super::*;

impl State {
    pub(super) fn run_due(&mut self) {
        // Thread states as of the batch's start, read once per thread; connection lists at
        // most once a second per process.
        let mut cache = std::mem::take(&mut self.diagnoses);
        cache.next_batch();
        let mut facts = process::FactsCache::default();
        // Act on the whole batch first and account after: a deadline late in a batch does not
        // wait for the metrics, records and log lines of the ones before it (the log lines and
        // event writes are the reporter thread's).
        let mut done = Vec::new();
        self.stack_budget = STACK_TIME_PER_BATCH;
        let t0 = now_ns();
        let dues = self
            .tracker
            .pop_due_at_most(now_ns(), super::acting::MAX_STEPS_PER_WAKE);
        for due in dues {
            let acted = self.run_step(due, &mut cache, &mut facts);
            if matches!(
                acted.outcome,
                Outcome::Ended | Outcome::TargetGone | Outcome::Refused(_)
            ) {
                self.tracker.finish(acted.due.key);
            }
            done.push(acted);
        }
        self.diagnoses = cache;
        self.pidfds.clear();
        let t1 = now_ns();
        let n = done.len();
        for acted in done {
            let record = self.account(acted);
            self.report(record);
        }
        if n >= BURST_LOG {
            info!(
                steps = n,
                acting_ms = t1.saturating_sub(t0) as f64 / 1e6,
                accounting_ms = now_ns().saturating_sub(t1) as f64 / 1e6,
                "burst of due steps: all acted on before any was accounted"
            );
        }
    }

    /// Is the request this ladder is about still what it was, in the kernel, right now?
    fn still_valid(kernel: &Kernel, key: Key, c: &ConnInfo) -> bool {
        tracker::still_current(
            key.reason,
            c,
            kernel.task(c.tid).as_ref(),
            kernel.conn(c.cookie).as_ref(),
        )
    }

    /// Takes one step of a ladder: diagnosis (first step only), the safety checks, the action.
    fn run_step(
        &mut self,
        due: Due,
        cache: &mut diagnose::Cache,
        facts: &mut process::FactsCache,
    ) -> Acted {
        let c = due.conn;
        let policy = &due.policy;
        let now = now_ns();
        let kernel = &self.kernel;
        let valid = || Self::still_valid(kernel, due.key, &c);
        let facts = facts.get(c.tgid, c.tid).unwrap_or(ProcessFacts {
            pid: c.tgid,
            tid: c.tid,
            ..Default::default()
        });
        // Read once for the diagnosis and the chain (again after a stack read, which takes
        // time); the action reads it once more after opening its target (`actions.rs`).
        let current = valid();
        let diagnosis = (due.index == 0 && current).then(|| {
            let cgroup = (!facts.cgroup.is_empty()).then(|| facts.cgroup.clone());
            diagnose::capture(c.tgid, c.tid, cgroup, cache)
        });
        // The owner's Python stack, before the first action, within its time limit.
        // A burst of deadlines reads stacks until the batch's share of time is spent; the
        // rest act at once (their records say why they have no stack).
        let stack = (due.index == 0 && self.cfg.stacks && policy.stacks && diagnosis.is_some())
            .then(|| {
                if self.stack_budget.is_zero() {
                    return crate::stacks::is_python(c.tgid).then(|| crate::stacks::StackReport {
                        frames: Vec::new(),
                        error: Some("skipped: this batch's time for stacks is spent".into()),
                        ms: 0.0,
                    });
                }
                let limit = self.cfg.stack_timeout.min(self.stack_budget);
                let r = crate::stacks::capture(c.tgid, c.tid, limit);
                let spent = Duration::from_secs_f64(r.as_ref().map_or(0.0, |r| r.ms) / 1e3);
                self.stack_budget = self.stack_budget.saturating_sub(spent);
                r
            })
            .flatten();
        let diagnosed = now_ns();
        let mode = self.cfg.mode_of(policy);
        let workers = &self.workers;
        let alive = || workers.count(&policy.name, &policy.selector);
        let verdict = decide::decide(
            decide::Inputs {
                action: due.step.action,
                mode,
                still_current: current && (stack.is_none() || valid()),
                guard: policy::guard(&facts, &self.cfg.protect, self.own_pid),
                floor: policy
                    .min_workers
                    .map(|k| (k, &alive as &dyn Fn() -> usize)),
                breaker: &policy.breaker,
                now_ns: now,
            },
            self.breakers.entry(policy.name.clone()).or_default(),
        );
        let outcome = match verdict {
            Verdict::Ended => Outcome::Ended,
            Verdict::Refused(r) => Outcome::Refused(r.label()),
            Verdict::Logged => Outcome::Delivered,
            Verdict::Observed => Outcome::Observed,
            Verdict::Act => match due.step.action {
                Action::Signal(sig) => actions::signal(
                    &mut self.pidfds,
                    due.step.target,
                    c.tgid,
                    c.tid,
                    sig.0,
                    valid,
                ),
                Action::Reset => actions::reset(&c, valid),
                Action::Log => Outcome::Delivered,
            },
            Verdict::Tripped => {
                error!(
                    policy = %policy.name,
                    max_actions = policy.breaker.max_actions,
                    window = %humantime::format_duration(policy.breaker.window),
                    cooldown = %humantime::format_duration(policy.breaker.cooldown),
                    "CIRCUIT BREAKER OPEN: too many actions; policy drops to observe-only for the cool-down"
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
        let done = now_ns();
        Acted {
            facts,
            now,
            diagnosed,
            done,
            mode,
            diagnosis,
            stack,
            outcome,
            due,
        }
    }

    /// The metrics and the record of a step taken (`run_step`).
    fn account(&mut self, a: Acted) -> ActionRecord {
        let Acted {
            due,
            facts,
            now,
            diagnosed,
            done,
            mode,
            diagnosis,
            stack,
            outcome,
        } = a;
        let (c, policy) = (due.conn, &due.policy);
        let lateness = done.saturating_sub(due.due_ns);
        if matches!(outcome, Outcome::Delivered | Outcome::ShutDown) {
            self.metrics.lateness.observe(lateness as f64 / 1e9);
        }
        let action = if matches!(due.step.action, Action::Log) {
            "log".to_string()
        } else {
            due.step.action.label()
        };
        self.metrics
            .actions
            .get_or_create(&ActionLabels {
                policy: policy.name.clone(),
                route: due.about.route.clone(),
                action: action.clone(),
                result: outcome.label().into(),
                reason: due.key.reason.label().into(),
                namespace: self
                    .metrics
                    .namespaces
                    .label(facts.pod.as_ref().map(|n| n.namespace.as_str())),
            })
            .inc();
        let detail = match &outcome {
            Outcome::Refused(r) => Some((*r).to_string()),
            Outcome::Failed(e) => Some(e.clone()),
            Outcome::ShutDown => Some(
                "shut down through the owner's descriptor (socket outside this network namespace, or no SOCK_DESTROY)"
                    .into(),
            ),
            _ => None,
        };
        let record = ActionRecord {
            event: "action",
            policy: policy.name.clone(),
            request: due.about.request.clone(),
            route: due.about.route.clone(),
            protocol: due.about.protocol,
            reason: due.key.reason,
            step: due.index,
            action,
            target: due.step.target,
            result: outcome.label(),
            detail,
            port: c.local_port,
            peer: peer_of(&c),
            pid: c.tgid,
            tid: c.tid,
            comm: facts.comm.clone(),
            elapsed_ms: done.saturating_sub(c.start_ns) / 1_000_000,
            budget_ms: due.about.budget.as_millis() as u64,
            lateness_ms: lateness as f64 / 1e6,
            diagnosis_ms: diagnosed.saturating_sub(now) as f64 / 1e6,
            mode,
            diagnosis,
            stack,
            namespace: facts.pod.as_ref().map(|n| n.namespace.clone()),
            pod: facts.pod.as_ref().map(|n| n.pod.clone()),
            container: facts.pod.as_ref().and_then(|n| n.container.clone()),
        };
        record
    }
}

/// A step as taken, for `account`.
struct Acted {
    due: Due,
    facts: ProcessFacts,
    /// When the step began, its diagnosis was read, and its action was done.
    now: u64,
    diagnosed: u64,
    done: u64,
    mode: Mode,
    diagnosis: Option<Arc<diagnose::Diagnosis>>,
    stack: Option<crate::stacks::StackReport>,
    outcome: Outcome,
}

/// A batch of at least this many steps logs how long acting and accounting took.
const BURST_LOG: usize = 64;

/// The most time one batch of due steps spends reading stacks (a burst of deadlines must not
/// wait 10 ms each).
const STACK_TIME_PER_BATCH: Duration = Duration::from_millis(50);

/// Live processes a policy's selector covers, for the `min_workers` floor: a scan of /proc,
/// remembered for `WORKERS_TTL` so a burst of actions scans once, not per action.
#[derive(Default)]
pub(super) struct Workers(std::cell::RefCell<HashMap<String, (usize, std::time::Instant)>>);

const WORKERS_TTL: Duration = Duration::from_millis(500);

impl Workers {
    fn count(&self, policy: &str, sel: &crate::config::Selector) -> usize {
        let now = std::time::Instant::now();
        if let Some((n, at)) = self.0.borrow().get(policy) {
            if now.duration_since(*at) < WORKERS_TTL {
                return *n;
            }
        }
        let n = count_selected(sel);
        self.0.borrow_mut().insert(policy.to_string(), (n, now));
        n
    }

    /// After an action of `policy` was carried out: its count is stale (a worker may be dying),
    /// so the next floor check scans again. The floor is never judged on a count from before an
    /// action.
    pub(super) fn forget(&self, policy: &str) {
        self.0.borrow_mut().remove(policy);
    }
}

fn count_selected(sel: &crate::config::Selector) -> usize {
    let Ok(all) = procfs::process::all_processes() else {
        return 0;
    };
    all.filter_map(Result::ok)
        .filter_map(|p| process::facts(p.pid as u32, p.pid as u32))
        .filter(|f| !f.kernel_thread && policy::selects(sel, f))
        .count()
}
