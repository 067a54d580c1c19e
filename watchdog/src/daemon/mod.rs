//! Wiring: load the kernel side, apply the config, then hand the state to the acting thread
//! (`acting.rs`), which turns kernel events into ladders and runs due steps. The tokio side
//! here forwards signals (reload, stop) and status requests to it, until SIGTERM.

use std::{
    collections::{HashMap, VecDeque},
    fs::File,
    io::Write,
    net::Ipv6Addr,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{atomic::Ordering, Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::{signal::unix::SignalKind, sync::mpsc};
use tracing::{debug, error, info, warn};
use watchdog_common::{conn_flag, head::proto, ConnInfo, Event, EventKind, PortConfig, ReqState};

use crate::{
    actions::{self, Outcome},
    api::{self, Health, StatusRequest},
    backstop::{Backstop, Plan},
    clock::now_ns,
    config::{Action, Config, Mode, Policy},
    decide::{self, Verdict},
    diagnose,
    evict::Evictor,
    loader::{Kernel, LoadOptions, Origin},
    metrics::{ActionLabels, Metrics, PolicyLabels, PortLabels, SlotLabel, SlotMap, WhyLabels},
    plan::{self, describe_ports},
    policy::{self, ProcessFacts},
    process, request,
    tracker::{self, About, Due, Key, Reason, Tracker},
};

/// Raises the daemon's scheduling priority (CAP_SYS_NICE); without it, the daemon runs anyway.
fn set_nice(nice: i32) {
    // SAFETY: setpriority on this process; no memory is involved.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        warn!(
            nice,
            error = %std::io::Error::last_os_error(),
            "could not set the daemon's niceness; deadlines may be late while workers saturate the CPUs"
        );
    }
}

/// Loading parsed the kernel's BTF (tens of MiB, all freed by now) and the allocator keeps
/// freed memory for reuse: hand it back, so the resident size is what the daemon really uses.
fn release_load_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

mod acting;
mod probe;
mod record;
mod status_doc;
mod step;
mod sweeper;
mod workers;

pub use record::ActionRecord;

const RECENT_ACTIONS: usize = 50;

struct State {
    kernel: Kernel,
    cfg: Arc<Config>,
    policies: Vec<Arc<Policy>>,
    config_path: Option<PathBuf>,
    config_stamp: Option<(u64, u64, i64, u64)>,
    /// `--observe` was given: no reload may turn enforcement on.
    observe_forced: bool,
    tracker: Tracker,
    /// One per policy and workload (`breakers.rs`), bounded.
    breakers: crate::breakers::Breakers,
    metrics: Metrics,
    slots: SlotMap,
    watched_ports: Vec<u16>,
    /// Writes records and log lines on a thread of its own; holds the recent actions.
    reporter: record::Reporter,
    own_pid: u32,
    backstop: Backstop,
    evictor: Evictor,
    workers: workers::Workers,
    /// Helper threads for the reads of targets' /proc files and stacks (`probe.rs`).
    probes: probe::Probes,
    kills: step::KillQueries,
    /// Diagnoses of the current batch, and connection lists kept a little longer.
    diagnoses: diagnose::Cache,
    sweeper: sweeper::Sweeper,
    /// Targets pinned during the current batch (`actions::Pidfds`).
    pidfds: actions::Pidfds,
    /// Owners' /proc facts, read once per wake-up of the acting thread: its events and its due
    /// steps share them (`acting.rs` clears them before each wake-up's work).
    facts: process::FactsCache,
}

/// Runs the daemon until SIGTERM or SIGINT. `observe_forced` (`--observe`) holds across reloads.
pub async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    observe_forced: bool,
) -> anyhow::Result<()> {
    set_nice(cfg.nice);
    crate::fds::init();
    crate::pods::configure(&cfg.kubelet_logs);
    let mut kernel = Kernel::load(&LoadOptions {
        probes: cfg.probes,
        state_dir: Some(cfg.state_dir.clone()),
        max_conns: cfg.max_connections,
        events_bytes: cfg.event_buffer_kib * 1024,
    })?;
    let ring = kernel
        .take_events()
        .context("event ring buffer already taken")?;

    let slots: SlotMap = Arc::new(RwLock::new(Vec::new()));
    let mut registry = Registry::default();
    let mut metrics = Metrics::register(
        &mut registry,
        Some(kernel.counters()),
        slots.clone(),
        kernel.probe_set.label(),
    );
    let health = Arc::new(Health::default());
    health.watch_links(crate::loader::LinkCheck::new(
        &cfg.state_dir,
        kernel.probe_set,
    ));
    health
        .last_tick
        .store(crate::clock::mono_secs(), Ordering::Relaxed);

    let http = std::net::TcpListener::bind(cfg.metrics_addr)
        .with_context(|| format!("binding the metrics listener on {}", cfg.metrics_addr))?;
    let status_socket_path = cfg.status_socket.clone();
    let status = api::bind_status(&cfg.status_socket)
        .with_context(|| format!("binding the status socket {}", cfg.status_socket.display()))?;
    let (status_tx, mut status_rx) = mpsc::channel::<StatusRequest>(8);
    let status_task = tokio::spawn(api::serve_status(
        status,
        status_tx,
        metrics.status_accept_errors.clone(),
    ));

    let reporter = record::Reporter::start(
        record::open_events(&cfg.events)?,
        step::Accounting::of(&mut metrics),
        metrics.records_dropped.clone(),
    )?;
    // A second handle on the connection table, for reads off the acting thread (the status
    // document, the backstop's sweeps, kill_query's re-check).
    let status_reader = Arc::new(
        crate::loader::ConnsReader::open(&cfg.state_dir)
            .context("opening the connection table for status, sweeps and kill_query")?,
    );
    let (kill_tx, mut kill_rx) = mpsc::unbounded_channel::<step::KillDone>();
    let wake = acting::new_wake()?;
    let sweeper = sweeper::Sweeper::start(
        status_reader.clone(),
        crate::loader::ConnsReader::open(&cfg.state_dir)
            .context("opening the connection table for eviction")?,
        sweeper::EvictReport {
            dropped: metrics.dropped.clone(),
            max: cfg.max_connections,
        },
        wake.clone(),
    )?;
    let mut st = State {
        kernel,
        cfg: Arc::new(cfg.clone()),
        policies: Vec::new(),
        config_stamp: config_path.as_deref().and_then(stamp),
        config_path,
        tracker: Tracker::default(),
        breakers: crate::breakers::Breakers::default(),
        metrics,
        slots,
        watched_ports: Vec::new(),
        reporter,
        own_pid: std::process::id(),
        backstop: Backstop::new(0),
        evictor: Evictor::new(cfg.max_connections),
        workers: workers::Workers::start()?,
        probes: probe::Probes::new(cfg.nice),
        diagnoses: diagnose::Cache::default(),
        sweeper,
        pidfds: actions::Pidfds::default(),
        facts: process::FactsCache::default(),
        observe_forced,
        kills: step::KillQueries::new(status_reader.clone(), kill_tx),
    };
    st.backstop = Backstop::new(st.backstop_failures());
    st.apply(cfg)?;
    if st.kernel.origin == Origin::Adopted {
        // The earlier daemon may have watched ports this config does not.
        for port in st.kernel.configured_ports() {
            if !st.watched_ports.contains(&port) {
                st.kernel.set_port(port, PortConfig::default())?;
            }
        }
    }
    st.kernel.adopt_existing("start");
    release_load_memory();
    // Served from here on: bound early (a taken port fails the start at once), but nothing is
    // answered before the programs are attached and the policies applied.
    api::http::spawn(http, Arc::new(registry), health.clone())
        .context("starting the metrics server thread")?;
    // Ready once the acting thread runs (it says so itself, `acting.rs`).
    info!(
        cgroup = %st.kernel.cgroup.display(),
        probes = st.kernel.probe_set.label(),
        state = ?st.kernel.origin,
        thread_pidfds = actions::thread_pidfds_supported(),
        metrics = %st.cfg.metrics_addr,
        status = %st.cfg.status_socket.display(),
        "watchdog running: programs attached, {} polic{} applied",
        st.policies.len(),
        if st.policies.len() == 1 { "y" } else { "ies" },
    );

    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sighup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let (done_tx, mut done) = tokio::sync::oneshot::channel();
    let (ctl, acting) = acting::spawn(st, ring, wake, health, status_reader, done_tx)?;
    let status_slots = Arc::new(tokio::sync::Semaphore::new(2));
    let mut failed = false;
    loop {
        tokio::select! {
            Some(reply) = status_rx.recv() => {
                // A snapshot from the acting thread, rendered on a blocking thread; at most two
                // at a time (the socket's channel holds the rest).
                let (tx, rx) = tokio::sync::oneshot::channel();
                ctl.send(acting::Cmd::Status(tx));
                let slots = status_slots.clone();
                tokio::spawn(async move {
                    let Ok(job) = rx.await else { return };
                    let Ok(permit) = slots.acquire_owned().await else { return };
                    tokio::task::spawn_blocking(move || {
                        let _ = reply.send(job.render());
                        drop(permit);
                    });
                });
            }
            Some(k) = kill_rx.recv() => ctl.send(acting::Cmd::KillDone(Box::new(k))),
            _ = sighup.recv() => ctl.send(acting::Cmd::Reload),
            _ = sigterm.recv() => { ctl.send(acting::Cmd::Stop(acting::Stop::Term)); break; }
            _ = sigint.recv() => { ctl.send(acting::Cmd::Stop(acting::Stop::Interrupt)); break; }
            _ = &mut done => {
                error!("the acting thread stopped on its own");
                failed = true;
                break;
            }
        }
    }
    let status_path = status_socket_path;
    tokio::task::spawn_blocking(move || acting.join())
        .await
        .ok()
        .and_then(Result::ok)
        .context("the acting thread panicked")?;
    status_task.abort();
    let _ = std::fs::remove_file(&status_path);
    anyhow::ensure!(!failed, "the acting thread stopped on its own");
    Ok(())
}

/// (dev, inode, mtime, size) of the file a path resolves to: changes when a ConfigMap swaps it.
fn stamp(p: &std::path::Path) -> Option<(u64, u64, i64, u64)> {
    std::fs::metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.mtime(), m.size()))
}

pub fn peer_of(c: &ConnInfo) -> String {
    let ip = Ipv6Addr::from(c.remote_addr);
    match ip.to_ipv4_mapped() {
        Some(v4) => format!("{v4}:{}", c.remote_port),
        None => format!("[{ip}]:{}", c.remote_port),
    }
}

impl State {
    /// Applies a validated config: kernel port table, metrics slots, policies.
    fn apply(&mut self, cfg: Config) -> anyhow::Result<()> {
        let plan = plan::plan(&cfg);
        if let Err(e) = self.write_plan(&plan) {
            // The kernel's tables and the policies change together or not at all: back to the
            // running config's tables.
            let old = plan::plan(&self.cfg);
            if let Err(e2) = self.write_plan(&old) {
                error!("restoring the previous kernel tables failed too: {e2:#}");
            }
            return Err(e);
        }
        let mut labels = plan.route_slots.clone();
        for (_, pc, label) in &plan.ports {
            if !labels.iter().any(|l: &SlotLabel| l.slot == pc.slot) {
                labels.push(SlotLabel {
                    slot: pc.slot,
                    labels: label.clone(),
                });
            }
        }
        if let Ok(mut s) = self.slots.write() {
            *s = labels;
        }
        self.policies = cfg.policies.iter().cloned().map(Arc::new).collect();
        self.workers.configure(&self.policies);
        for p in &self.policies {
            let mode = cfg.mode_of(p);
            info!(
                policy = %p.name,
                ports = %describe_ports(p),
                budget = %humantime::format_duration(p.budget),
                steps = p.steps.len(),
                routes = p.routes.len(),
                client_gone = p.client_gone.is_some(),
                mode = ?mode,
                "policy applied"
            );
        }
        self.cfg = Arc::new(cfg);
        Ok(())
    }

    /// Writes a plan's route and port tables. Routes first: a port that gains routes finds them
    /// in place; one that loses them misses its old ones (the port's default) until its flag is
    /// cleared. Every port written is remembered at once, so a failed write can be undone.
    fn write_plan(&mut self, plan: &plan::Plan) -> anyhow::Result<()> {
        self.kernel.set_routes(&plan.routes)?;
        for old in self.watched_ports.clone() {
            if !plan.ports.iter().any(|(p, _, _)| *p == old) {
                self.kernel.set_port(old, PortConfig::default())?;
                self.watched_ports.retain(|p| *p != old);
            }
        }
        for (port, pc, _) in &plan.ports {
            if !self.watched_ports.contains(port) {
                self.watched_ports.push(*port);
            }
            self.kernel.set_port(*port, *pc)?;
        }
        Ok(())
    }

    /// The new file under the reload rule (`Config::reloaded`), with a warning when its fixed
    /// settings differ from the running ones.
    fn reloaded(&self, new: Config) -> Config {
        let (merged, differs) = self.cfg.reloaded(new, self.observe_forced);
        if differs {
            warn!(
                "the [daemon] settings in the file differ from the running ones (or a command-line flag overrides them): they take effect at the next start, not on reload"
            );
        }
        merged
    }

    fn reload(&mut self, why: &str) {
        let Some(path) = self.config_path.clone() else {
            info!("{why}: no config file to reload (running from command-line flags)");
            return;
        };
        self.config_stamp = stamp(&path);
        let watched_before = self.watched_ports.clone();
        let result = Config::load(&path)
            .map_err(anyhow::Error::from)
            .and_then(|c| {
                let merged = self.reloaded(c);
                self.apply(merged)
            });
        match result {
            Ok(()) => {
                info!(file = %path.display(), "{why}: configuration reloaded");
                if self
                    .watched_ports
                    .iter()
                    .any(|p| *p != 0 && !watched_before.contains(p))
                {
                    self.kernel.adopt_existing(why);
                }
                self.metrics
                    .reloads
                    .get_or_create(&crate::metrics::ResultLabels {
                        result: "success".into(),
                    })
                    .inc();
            }
            Err(e) => {
                error!(file = %path.display(), "{why}: new configuration refused, the previous one stays in force: {e:#}");
                self.metrics
                    .reloads
                    .get_or_create(&crate::metrics::ResultLabels {
                        result: "error".into(),
                    })
                    .inc();
            }
        }
    }

    fn housekeeping(&mut self) {
        crate::fds::refill();
        if let Some(path) = &self.config_path {
            let now = stamp(path);
            if now.is_some() && now != self.config_stamp {
                self.reload("config file changed");
            }
        }
        let now = now_ns();
        // The gauge is 1 while any workload's breaker of the policy is open.
        for p in &self.policies {
            let l = PolicyLabels {
                policy: p.name.clone(),
            };
            let gauge = self.metrics.observe_only.get_or_create(&l);
            if gauge.get() == 1 && !self.breakers.policy_open(&p.name, now) {
                warn!(policy = %p.name, "circuit breaker re-armed: policy enforces again for every workload");
                gauge.set(0);
            }
        }
    }

    fn policy_for(&self, port: u16, facts: &ProcessFacts) -> Option<Arc<Policy>> {
        let p = policy::select(&self.cfg, port, facts)?;
        self.policies.iter().find(|q| q.name == p.name).cloned()
    }

    fn on_event(&mut self, ev: Event, facts: &mut process::FactsCache) {
        self.metrics.events.inc();
        let c = ev.conn;
        if !tracker::consistent(&c, self.kernel.current(&c).as_ref()) {
            debug!(port = c.local_port, peer = %peer_of(&c), "event read while the next request started; its own timer covers that one");
            return;
        }
        let Some(facts) = facts.get(c.tgid, c.tid) else {
            debug!(
                pid = c.tgid,
                tid = c.tid,
                "event for a process that has already exited"
            );
            return;
        };
        let Some(policy) = self.policy_for(c.local_port, &facts) else {
            debug!(pid = c.tgid, comm = %facts.comm, port = c.local_port, "no policy selects this process; not acting");
            return;
        };
        let (route, index) = request::route_of(&c, &ev.head, &policy.routes);
        let Some((budget, steps)) = policy.ladder_for(index) else {
            debug!(port = c.local_port, peer = %peer_of(&c), route, "route never enforced (budget = \"off\")");
            return;
        };
        let steps = steps.to_vec();
        let about = Arc::new(About {
            request: request::describe(&c, &ev.head, self.cfg.record_query_string),
            route: route.clone(),
            protocol: proto::label(c.proto),
            budget,
            event_ns: ev.ts_ns,
        });
        let labels = PortLabels {
            policy: policy.name.clone(),
            port: self.slots.read().map_or_else(
                |_| plan::OTHER_PORT.into(),
                |s| plan::port_label(&s, c.local_port),
            ),
            route,
        };
        match EventKind::from_u32(ev.kind) {
            Some(EventKind::Deadline) => {
                let key = Key {
                    cookie: c.cookie,
                    gen: c.gen,
                    reason: Reason::Budget,
                };
                if self.tracker.admit(key, c, about, policy, steps, c.start_ns) {
                    self.metrics.budget_exceeded.get_or_create(&labels).inc();
                }
            }
            Some(kind @ (EventKind::PeerFin | EventKind::PeerReset)) => {
                let Some(cg) = policy.client_gone.clone() else {
                    return;
                };
                let since_start = Duration::from_nanos(ev.ts_ns.saturating_sub(c.start_ns));
                if kind == EventKind::PeerFin && since_start < cg.half_close_window {
                    debug!(port = c.local_port, peer = %peer_of(&c), "FIN right after the request: a half-close, not a hang-up");
                    return;
                }
                let key = Key {
                    cookie: c.cookie,
                    gen: c.gen,
                    reason: Reason::ClientGone,
                };
                let base = ev.ts_ns.saturating_add(policy::nanos(cg.grace));
                if self.tracker.admit(key, c, about, policy, cg.steps, base) {
                    self.metrics.client_gone.get_or_create(&labels).inc();
                    info!(
                        policy = %labels.policy, port = c.local_port, peer = %peer_of(&c), pid = c.tgid, tid = c.tid,
                        how = if kind == EventKind::PeerFin { "FIN" } else { "RST" },
                        elapsed_ms = since_start.as_millis() as u64,
                        "client gone while its request is in flight"
                    );
                }
            }
            None => {}
        }
    }

    /// Makes room once the table passes its high-water mark (`evict.rs`): unselected owners'
    /// entries first, then workloads over their share, then the idle longest. Two counter reads
    /// per poll; the table scan, the owners' /proc facts and the deletions are the sweeper
    /// thread's (`sweeper.rs`), never the acting thread's.
    fn evict_if_needed(&mut self) {
        let tracked = self.kernel.counters().tracked();
        if !self.evictor.due(tracked) {
            return;
        }
        self.sweeper.evict(self.evictor, self.cfg.clone(), tracked);
        self.evictor.scanned(tracked);
    }

    /// The kernel's count of deadline failures the backstop covers.
    fn backstop_failures(&self) -> u64 {
        self.kernel.counters().backstop_failures()
    }

    /// Hands requests whose kernel deadline path failed (see `backstop.rs`) to `on_event`, as
    /// if their deadline event had arrived.
    /// A read of the whole table is asked of the sweeper thread (`sweeper.rs`) and handed on
    /// when it is done (`swept`).
    fn sweep_if_needed(&mut self) {
        let now = now_ns();
        let recovered = match self.backstop.plan(self.backstop_failures(), now) {
            Plan::Nothing => return,
            Plan::Table => {
                self.sweeper.request();
                return;
            }
            Plan::Marked(asked) => {
                let conns: Vec<ConnInfo> =
                    asked.iter().filter_map(|c| self.kernel.conn(*c)).collect();
                self.backstop.recheck(&asked, &conns, now)
            }
        };
        self.recover(recovered, now);
    }

    /// A table read the sweeper finished: the entries in flight, read from `at` on. Entries
    /// not in flight mean nothing to the backstop.
    fn swept(&mut self) {
        if let Some((at, in_flight)) = self.sweeper.take() {
            let recovered = self.backstop.sweep(&in_flight, at);
            self.recover(recovered, now_ns());
        }
    }

    fn recover(&mut self, recovered: Vec<(ConnInfo, crate::backstop::Recovered)>, now: u64) {
        let mut facts = process::FactsCache::default();
        for (conn, why) in recovered {
            self.metrics
                .recovered
                .get_or_create(&WhyLabels {
                    why: why.label().into(),
                })
                .inc();
            debug!(port = conn.local_port, peer = %peer_of(&conn), why = why.label(), "backstop: over-budget request without a kernel event");
            let head = self
                .kernel
                .record(conn.cookie)
                .filter(|r| r.info.gen == conn.gen)
                .map(|r| r.head)
                .unwrap_or([0; watchdog_common::head::HEAD_BYTES]);
            self.on_event(
                Event {
                    kind: EventKind::Deadline as u32,
                    version: watchdog_common::LAYOUT_VERSION,
                    ts_ns: now,
                    conn,
                    head,
                },
                &mut facts,
            );
        }
    }
}
