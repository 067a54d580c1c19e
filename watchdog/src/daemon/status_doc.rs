//! The `watchdog status` document: tracked connections, requests in flight with what they are,
//! policies, recent actions. The event loop takes a snapshot of its own state (`State::status_job`,
//! cheap); the document, which reads the whole connection table and /proc, is built from it on
//! a blocking thread (`StatusJob::render`), never on the loop that acts.

use super::*;
use crate::loader::ConnsReader;

/// What the document needs from the event loop, taken in one go.
pub(super) struct StatusJob {
    cfg: Arc<Config>,
    policies: Vec<Arc<Policy>>,
    /// (policy, workload) whose breaker holds them in observe-only now.
    open_breakers: Vec<(String, String)>,
    ladders_active: usize,
    /// The reporter's recent actions, read when the document is rendered: the acting thread
    /// (SCHED_FIFO) never takes a lock a normal thread holds.
    recent: record::Recent,
    reader: Arc<ConnsReader>,
}

impl State {
    pub(super) fn status_job(&self, reader: Arc<ConnsReader>) -> StatusJob {
        let now = now_ns();
        StatusJob {
            cfg: self.cfg.clone(),
            policies: self.policies.clone(),
            open_breakers: self
                .breakers
                .open_at(now)
                .into_iter()
                .map(|k| (k.policy.clone(), k.workload.describe()))
                .collect(),
            ladders_active: self.tracker.len(),
            recent: self.reporter.recent.clone(),
            reader,
        }
    }
}

impl StatusJob {
    fn policy_for(&self, port: u16, facts: &ProcessFacts) -> Option<Arc<Policy>> {
        let p = policy::select(&self.cfg, port, facts)?;
        self.policies.iter().find(|q| q.name == p.name).cloned()
    }

    pub(super) fn render(self) -> String {
        #[derive(Serialize)]
        struct InFlight {
            port: u16,
            request: Option<String>,
            route: String,
            protocol: &'static str,
            peer: String,
            pid: u32,
            tid: u32,
            comm: String,
            age_ms: u64,
            policy: Option<String>,
            budget_ms: Option<u64>,
            #[serde(flatten)]
            pod: Option<crate::pods::PodNames>,
        }
        #[derive(Serialize)]
        struct PolicyView {
            name: String,
            ports: String,
            budget_ms: u64,
            mode: Mode,
            /// Some workload's breaker holds the policy in observe-only for it.
            observe_only_breaker: bool,
            /// Those workloads.
            observe_only_workloads: Vec<String>,
            steps: Vec<String>,
            client_gone: bool,
        }
        #[derive(Serialize)]
        struct Connections {
            tracked: usize,
            /// Answered `101 Switching Protocols`: no longer tracked for requests.
            upgraded: usize,
            /// Open before their port was watched, adopted, and no request seen since: their
            /// owner is known only once they read (`adopted, idle`).
            adopted_idle: usize,
            by_protocol: std::collections::BTreeMap<&'static str, usize>,
        }
        #[derive(Serialize)]
        struct Status<'a> {
            version: &'static str,
            connections: Connections,
            in_flight: Vec<InFlight>,
            policies: Vec<PolicyView>,
            ladders_active: usize,
            recent_actions: Vec<&'a ActionRecord>,
        }
        let now = now_ns();
        let records = self.reader.records();
        let mut connections = Connections {
            tracked: records.len(),
            upgraded: 0,
            adopted_idle: 0,
            by_protocol: Default::default(),
        };
        for r in &records {
            if r.info.flags & conn_flag::UPGRADED != 0 {
                connections.upgraded += 1;
            }
            if r.info.flags & conn_flag::ADOPTED != 0 && r.info.gen == 0 {
                connections.adopted_idle += 1;
            }
            *connections
                .by_protocol
                .entry(proto::label(r.info.proto))
                .or_default() += 1;
        }
        // One /proc read per owning thread, not per request (an event loop owns many).
        let mut facts_cache = process::FactsCache::default();
        let in_flight = records
            .iter()
            .filter(|r| r.info.state == ReqState::InFlight as u32)
            .map(|r| {
                let c = r.info;
                let facts = facts_cache.get(c.tgid, c.tid);
                let policy = facts
                    .as_ref()
                    .and_then(|f| self.policy_for(c.local_port, f));
                let (route, index) = policy
                    .as_ref()
                    .map(|p| request::route_of(&c, &r.head, &p.routes))
                    .unwrap_or(("default".into(), None));
                InFlight {
                    port: c.local_port,
                    request: request::describe(&c, &r.head, self.cfg.record_query_string),
                    route,
                    protocol: proto::label(c.proto),
                    peer: peer_of(&c),
                    pid: c.tgid,
                    tid: c.tid,
                    pod: facts.as_ref().and_then(|f| f.pod.clone()),
                    comm: facts.map(|f| f.comm.clone()).unwrap_or_default(),
                    age_ms: now.saturating_sub(c.start_ns) / 1_000_000,
                    budget_ms: policy
                        .as_ref()
                        .and_then(|p| p.ladder_for(index))
                        .map(|(b, _)| b.as_millis() as u64),
                    policy: policy.map(|p| p.name.clone()),
                }
            })
            .collect();
        let policies = self
            .policies
            .iter()
            .map(|p| PolicyView {
                name: p.name.clone(),
                ports: describe_ports(p),
                budget_ms: p.budget.as_millis() as u64,
                mode: self.cfg.mode_of(p),
                observe_only_breaker: self.open_breakers.iter().any(|(n, _)| *n == p.name),
                observe_only_workloads: self
                    .open_breakers
                    .iter()
                    .filter(|(n, _)| *n == p.name)
                    .map(|(_, w)| w.clone())
                    .collect(),
                steps: p
                    .steps
                    .iter()
                    .map(|s| {
                        format!(
                            "{} {} ({:?})",
                            humantime::format_duration(s.after),
                            s.action.label(),
                            s.target
                        )
                    })
                    .collect(),
                client_gone: p.client_gone.is_some(),
            })
            .collect();
        let recent: Vec<ActionRecord> = self
            .recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default();
        let doc = Status {
            version: env!("CARGO_PKG_VERSION"),
            connections,
            in_flight,
            policies,
            ladders_active: self.ladders_active,
            recent_actions: recent.iter().collect(),
        };
        serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
    }
}
