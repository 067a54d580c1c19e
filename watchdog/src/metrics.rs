//! Prometheus metrics. Request counts, durations and in-flight gauges are read straight from the
//! kernel's per-CPU counters at scrape time (no per-request work in userspace); enforcement
//! metrics are counted by the daemon as it acts. Labels are bounded: policy, port, route (a
//! pattern from the config, `default` or `unknown`; never a raw path), protocol, action, result,
//! reason; never pids or peers.

use std::sync::{Arc, RwLock};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, MetricType},
    registry::Registry,
};
use watchdog_common::{head::proto, DURATION_BUCKETS_MS};

use crate::loader::Counters;

#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    pub policy: String,
    pub port: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub policy: String,
    pub route: String,
    pub action: String,
    pub result: String,
    pub reason: String,
    /// The owner's Kubernetes namespace, bounded (`pods::NamespaceLabels`); empty outside pods.
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhyLabels {
    pub why: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SetLabels {
    pub set: String,
}

/// Which metrics slot stands for which port (or route) and policies (replaced on reload).
#[derive(Clone, Debug, Default)]
pub struct SlotLabel {
    pub slot: u32,
    pub labels: PortLabels,
}

pub type SlotMap = Arc<RwLock<Vec<SlotLabel>>>;

/// Metrics the daemon updates itself.
pub struct Metrics {
    pub budget_exceeded: Family<PortLabels, Counter>,
    pub client_gone: Family<PortLabels, Counter>,
    pub actions: Family<ActionLabels, Counter>,
    pub lateness: Histogram,
    pub reloads: Family<ResultLabels, Counter>,
    pub breaker_trips: Family<PolicyLabels, Counter>,
    /// Connections cut because their client stalled on its own time (`blame.rs`).
    pub client_timeouts: Family<PolicyLabels, Counter>,
    pub observe_only: Family<PolicyLabels, Gauge>,
    pub events: Counter,
    pub recovered: Family<WhyLabels, Counter>,
    pub dropped: Family<ReasonLabels, Counter>,
    /// Action records dropped: the reporter's queues were full (an event stream nobody reads).
    pub records_dropped: Counter,
    /// Failed accepts on the status socket (descriptors exhausted), each followed by a pause.
    pub status_accept_errors: Counter,
    /// 1 while the acting thread runs in the realtime class (SCHED_FIFO).
    pub acting_realtime: Gauge,
    /// Which namespaces keep a label of their own on `actions`.
    pub namespaces: crate::pods::NamespaceLabels,
}

impl Metrics {
    /// Registers every metric, the kernel collector included.
    pub fn register(
        registry: &mut Registry,
        counters: Option<Arc<Counters>>,
        slots: SlotMap,
        probe_set: &str,
    ) -> Self {
        let m = Self {
            budget_exceeded: Family::default(),
            client_gone: Family::default(),
            actions: Family::default(),
            // 0.1 ms .. ~3.3 s.
            lateness: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 16,
            )),
            reloads: Family::default(),
            breaker_trips: Family::default(),
            client_timeouts: Family::default(),
            observe_only: Family::default(),
            events: Counter::default(),
            recovered: Family::default(),
            dropped: Family::default(),
            records_dropped: Counter::default(),
            status_accept_errors: Counter::default(),
            acting_realtime: Gauge::default(),
            namespaces: crate::pods::NamespaceLabels::default(),
        };
        registry.register(
            "watchdog_client_timeouts",
            "Connections cut because the client stalled on its own time (an unfinished request head, or a worker blocked reading it); the worker was not signalled",
            m.client_timeouts.clone(),
        );
        registry.register(
            "watchdog_budget_exceeded",
            "Requests still in flight when their budget ran out",
            m.budget_exceeded.clone(),
        );
        registry.register(
            "watchdog_client_gone",
            "Requests whose caller hung up while they were in flight",
            m.client_gone.clone(),
        );
        registry.register(
            "watchdog_actions",
            "Enforcement steps taken, by action and result",
            m.actions.clone(),
        );
        registry.register(
            "watchdog_enforcement_lateness_seconds",
            "Time from a step's due time to its action",
            m.lateness.clone(),
        );
        registry.register(
            "watchdog_config_reloads",
            "Configuration reloads by result",
            m.reloads.clone(),
        );
        registry.register(
            "watchdog_breaker_trips",
            "Times a policy's kill-rate breaker opened",
            m.breaker_trips.clone(),
        );
        registry.register(
            "watchdog_policy_observe_only",
            "1 while a policy's breaker holds it in observe-only mode",
            m.observe_only.clone(),
        );
        registry.register(
            "watchdog_kernel_events",
            "Events received from the kernel",
            m.events.clone(),
        );
        registry.register(
            "watchdog_deadlines_recovered",
            "Over-budget requests found by the backstop sweep: no kernel timer, or its event lost",
            m.recovered.clone(),
        );
        registry.register(
            "watchdog_connections_dropped",
            "Connections dropped from tracking to make room when the table passed its high-water mark, by reason: unselected (no policy selects the owner), over_quota (beyond its workload's share), idle",
            m.dropped.clone(),
        );
        registry.register(
            "watchdog_records_dropped",
            "Action records not written: the event stream or the reporter fell MAX_QUEUED records behind (a stream nobody reads); the actions themselves were taken",
            m.records_dropped.clone(),
        );
        registry.register(
            "watchdog_status_accept_errors",
            "Failed accepts on the status socket (descriptors exhausted); each waits 50 ms before the next",
            m.status_accept_errors.clone(),
        );
        registry.register(
            "watchdog_acting_thread_realtime",
            "1 while the thread that acts on deadlines runs in the realtime class (SCHED_FIFO; needs CAP_SYS_NICE), 0 in the normal class",
            m.acting_realtime.clone(),
        );
        let build: Family<VersionLabels, Gauge> = Family::default();
        build
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register("watchdog_build_info", "Build information", build);
        let probes: Family<SetLabels, Gauge> = Family::default();
        probes
            .get_or_create(&SetLabels {
                set: probe_set.into(),
            })
            .set(1);
        registry.register("watchdog_probe_set", "The kernel probe set in use", probes);
        if let Some(counters) = counters {
            registry.register_collector(Box::new(KernelCollector { counters, slots }));
        }
        m
    }
}

/// Encodes the kernel's counters at scrape time.
#[derive(Debug)]
struct KernelCollector {
    counters: Arc<Counters>,
    slots: SlotMap,
}

impl prometheus_client::collector::Collector for KernelCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let slots = self.slots.read().map(|s| s.clone()).unwrap_or_default();
        let stats: Vec<_> = slots
            .iter()
            .map(|s| (s, self.counters.slot_stats(s.slot)))
            .collect();

        let mut e = enc.encode_descriptor(
            "watchdog_requests",
            "Requests started on watched ports",
            None,
            MetricType::Counter,
        )?;
        for (s, st) in &stats {
            e.encode_family(&s.labels)?
                .encode_counter::<PortLabels, u64, f64>(&st.started, None)?;
        }
        let mut e = enc.encode_descriptor(
            "watchdog_request_duration_seconds",
            "Time from a request's first byte in to its first byte out",
            None,
            MetricType::Histogram,
        )?;
        for (s, st) in &stats {
            let buckets: Vec<(f64, u64)> = DURATION_BUCKETS_MS
                .iter()
                .map(|ms| *ms as f64 / 1000.0)
                .chain(std::iter::once(f64::MAX))
                .zip(st.buckets.iter().copied())
                .collect();
            e.encode_family(&s.labels)?.encode_histogram::<PortLabels>(
                st.duration_sum_ns as f64 / 1e9,
                st.responded(),
                &buckets,
                None,
            )?;
        }
        let mut e = enc.encode_descriptor(
            "watchdog_requests_in_flight",
            "Requests in flight now",
            None,
            MetricType::Gauge,
        )?;
        for (s, st) in &stats {
            e.encode_family(&s.labels)?
                .encode_gauge(&(st.in_flight() as i64))?;
        }
        let mut e = enc.encode_descriptor(
            "watchdog_requests_closed_in_flight",
            "Requests that ended because the connection closed before any response byte",
            None,
            MetricType::Counter,
        )?;
        for (s, st) in &stats {
            e.encode_family(&s.labels)?
                .encode_counter::<PortLabels, u64, f64>(&st.closed_in_flight, None)?;
        }
        // Connection-level counters exist for port slots only (a route has no connections).
        let ports: Vec<_> = stats
            .iter()
            .filter(|(s, _)| s.slot < watchdog_common::limits::MAX_PORT_SLOTS)
            .collect();
        let port_labels = |s: &SlotLabel, extra: Option<(&str, &str)>| {
            let mut l = vec![
                ("policy".to_string(), s.labels.policy.clone()),
                ("port".to_string(), s.labels.port.clone()),
            ];
            if let Some((k, v)) = extra {
                l.push((k.to_string(), v.to_string()));
            }
            l
        };
        let mut e = enc.encode_descriptor(
            "watchdog_connections",
            "Tracked connections by the protocol their first request showed",
            None,
            MetricType::Counter,
        )?;
        for (s, st) in &ports {
            for (p, n) in st.protocols.iter().enumerate() {
                let l = port_labels(s, Some(("protocol", proto::label(p as u8))));
                e.encode_family(&l)?
                    .encode_counter::<PortLabels, u64, f64>(n, None)?;
            }
        }
        let mut e = enc.encode_descriptor(
            "watchdog_connections_upgraded",
            "Connections that answered 101 Switching Protocols (WebSocket...) and are no longer tracked for requests",
            None,
            MetricType::Counter,
        )?;
        for (s, st) in &ports {
            e.encode_family(&port_labels(s, None))?
                .encode_counter::<PortLabels, u64, f64>(&st.upgraded, None)?;
        }
        let mut e = enc.encode_descriptor(
            "watchdog_connections_adopted",
            "Connections open before their port was watched (daemon start, reload) that the socket iterator took into tracking",
            None,
            MetricType::Counter,
        )?;
        for (s, st) in &ports {
            e.encode_family(&port_labels(s, None))?
                .encode_counter::<PortLabels, u64, f64>(&st.adopted, None)?;
        }
        let mut e = enc.encode_descriptor(
            "watchdog_requests_route_unknown",
            "Requests on a port with routes that ran on the policy's budget because their route could not be read",
            None,
            MetricType::Counter,
        )?;
        for (s, st) in &ports {
            for (why, n) in [
                ("unreadable", st.route_unreadable),
                ("split", st.route_split),
            ] {
                e.encode_family(&port_labels(s, Some(("why", why))))?
                    .encode_counter::<PortLabels, u64, f64>(&n, None)?;
            }
        }

        let k = self.counters.stats();
        let tracked = k.conns_opened.saturating_sub(k.conns_closed) as i64;
        enc.encode_descriptor(
            "watchdog_tracked_connections",
            "Connections on watched ports being tracked",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&tracked)?;
        enc.encode_descriptor(
            "watchdog_events_lost",
            "Kernel events dropped because the ring buffer was full",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<PortLabels, u64, f64>(&k.events_lost, None)?;
        let mut e = enc.encode_descriptor(
            "watchdog_map_evictions",
            "Entries refused because a kernel table was full (existing entries are never evicted)",
            None,
            MetricType::Counter,
        )?;
        e.encode_family(&[("table", "connections")])?
            .encode_counter::<PortLabels, u64, f64>(&k.conns_table_full, None)?;
        e.encode_family(&[("table", "tasks")])?
            .encode_counter::<PortLabels, u64, f64>(&k.tasks_table_full, None)?;
        e.encode_family(&[("table", "streams")])?
            .encode_counter::<PortLabels, u64, f64>(&k.streams_table_full, None)?;
        e.encode_family(&[("table", "streams_port_share")])?
            .encode_counter::<PortLabels, u64, f64>(&k.streams_port_full, None)?;
        e.encode_family(&[("table", "owners")])?
            .encode_counter::<PortLabels, u64, f64>(&k.owners_table_full, None)?;
        e.encode_family(&[("table", "socket_states")])?
            .encode_counter::<PortLabels, u64, f64>(&k.sock_states_table_full, None)?;
        let mut e = enc.encode_descriptor(
            "watchdog_http2_streams",
            "HTTP/2 streams the kernel followed: started (client HEADERS), ended (the server's HEADERS or either side's RST_STREAM), reaped (their connection closed first)",
            None,
            MetricType::Counter,
        )?;
        for (event, n) in [
            ("started", k.streams_started),
            ("ended", k.streams_ended),
            ("reaped", k.streams_reaped),
        ] {
            e.encode_family(&[("event", event)])?
                .encode_counter::<PortLabels, u64, f64>(&n, None)?;
        }
        let in_flight = k
            .streams_started
            .saturating_sub(k.streams_ended + k.streams_reaped) as i64;
        enc.encode_descriptor(
            "watchdog_http2_streams_in_flight",
            "HTTP/2 streams in the kernel's stream table now",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&in_flight)?;
        enc.encode_descriptor(
            "watchdog_http2_connections_lost",
            "HTTP/2 connections whose frames the kernel lost track of (a write it cannot read, too many frames in one call): their streams are no longer followed",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<PortLabels, u64, f64>(&k.h2_lost, None)?;
        let mut e = enc.encode_descriptor(
            "watchdog_kernel_deadlines",
            "Kernel deadline timers that fired",
            None,
            MetricType::Counter,
        )?;
        e.encode_family(&[("result", "in_flight")])?
            .encode_counter::<PortLabels, u64, f64>(&k.deadlines_fired, None)?;
        e.encode_family(&[("result", "already_ended")])?
            .encode_counter::<PortLabels, u64, f64>(&k.deadlines_stale, None)?;
        e.encode_family(&[("result", "rearmed")])?
            .encode_counter::<PortLabels, u64, f64>(&k.deadlines_rearmed, None)?;
        e.encode_family(&[("result", "raced")])?
            .encode_counter::<PortLabels, u64, f64>(&k.deadlines_raced, None)?;
        enc.encode_descriptor(
            "watchdog_kernel_starts_contended",
            "Request starts that found another start writing the connection's record: not tracked",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<PortLabels, u64, f64>(&k.starts_contended, None)?;
        enc.encode_descriptor(
            "watchdog_kernel_tasks_execed",
            "Threads dropped from the kernel's task table because they called execve as a non-leader (their tid vanished)",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<PortLabels, u64, f64>(&k.tasks_execed, None)?;
        let mut e = enc.encode_descriptor(
            "watchdog_kernel_timer_errors",
            "bpf_timer calls that failed: requests left without a deadline timer",
            None,
            MetricType::Counter,
        )?;
        e.encode_family(&[("call", "init")])?
            .encode_counter::<PortLabels, u64, f64>(&k.timer_init_errors, None)?;
        e.encode_family(&[("call", "start")])?
            .encode_counter::<PortLabels, u64, f64>(&k.timer_start_errors, None)?;
        Ok(())
    }
}

/// Renders the registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}
