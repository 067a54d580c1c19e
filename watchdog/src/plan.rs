//! What the kernel's tables should hold for a config: the port table (deadline, metrics slot,
//! flags per port), the route table, and which metrics labels each slot stands for. Pure: the
//! daemon writes the plan (`daemon.rs` `apply`), tests read it.

use watchdog_common::{
    limits::MAX_PORT_SLOTS, PortConfig, PORT_CLIENT_GONE, PORT_NO_UPGRADES, PORT_ROUTES,
    PORT_WATCHED,
};

use crate::{
    config::{Config, Policy},
    loader::MAX_SLOTS,
    metrics::{PortLabels, SlotLabel},
    policy,
    routes::{self, Entry},
};

/// The `route` label of requests that take no route of their policy.
pub const DEFAULT_ROUTE: &str = "default";

/// The kernel tables for one config.
pub struct Plan {
    /// (index, config, labels of its slot); index 0 is the wildcard entry.
    pub ports: Vec<(u16, PortConfig, PortLabels)>,
    /// Every route-table entry.
    pub routes: Vec<Entry>,
    /// Labels of the route slots (after the port slots).
    pub route_slots: Vec<SlotLabel>,
}

/// The plan of `cfg`.
pub fn plan(cfg: &Config) -> Plan {
    let ports = port_plan(cfg);
    // Route slots: one per route, in policy then file order, after the port slots.
    let mut route_slots = Vec::new();
    let mut slots_of: Vec<Vec<u32>> = Vec::new();
    for p in &cfg.policies {
        let mut mine = Vec::new();
        for r in &p.routes {
            let slot = MAX_PORT_SLOTS + route_slots.len() as u32;
            mine.push(slot);
            route_slots.push(SlotLabel {
                slot,
                labels: PortLabels {
                    policy: p.name.clone(),
                    port: describe_ports(p),
                    route: r.label(),
                },
            });
        }
        slots_of.push(mine);
    }
    let mut entries = Vec::new();
    for (index, _, _) in &ports {
        let here: Vec<(usize, &Policy)> = cfg
            .policies
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                if *index == 0 {
                    p.ports.is_empty()
                } else {
                    p.covers_port(*index)
                }
            })
            .collect();
        let Some(&(ri, routed)) = here.iter().find(|(_, p)| !p.routes.is_empty()) else {
            continue;
        };
        let others = here
            .iter()
            .filter(|(i, _)| *i != ri)
            .map(|(_, p)| p.first_deadline())
            .min();
        entries.extend(routes::table(*index, &routed.routes, &slots_of[ri], others));
    }
    Plan {
        ports,
        routes: entries,
        route_slots,
    }
}

/// The `port` label of a request the daemon counts itself: the port's number when a config's
/// port slot stands for it (at most `MAX_SLOTS` of them), `other` for every other port, so a
/// policy on every port (`ports = "*"`) or a large range cannot make a series per port.
pub fn port_label(slots: &[SlotLabel], port: u16) -> String {
    let own = port.to_string();
    if slots.iter().any(|s| s.slot != 0 && s.labels.port == own) {
        own
    } else {
        OTHER_PORT.into()
    }
}

/// The `port` label of the ports without a slot of their own.
pub const OTHER_PORT: &str = "other";

/// Ports as a label: `8080,9000-9010`, or `*` for every port.
pub fn describe_ports(p: &Policy) -> String {
    if p.ports.is_empty() {
        return "*".into();
    }
    p.ports
        .iter()
        .map(|r| {
            if r.first == r.last {
                r.first.to_string()
            } else {
                format!("{}-{}", r.first, r.last)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What the kernel's port table should hold: (index, config, metrics labels). Index 0 is the
/// wildcard entry used by every port without its own. A port's deadline is the earliest first
/// step of any policy that could apply there; the daemon times later steps itself.
pub fn port_plan(cfg: &Config) -> Vec<(u16, PortConfig, PortLabels)> {
    let flags_of = |ps: &[&Policy]| {
        let mut f = PORT_WATCHED;
        if ps.iter().any(|p| p.client_gone.is_some()) {
            f |= PORT_CLIENT_GONE;
        }
        if ps.iter().any(|p| !p.routes.is_empty()) {
            f |= PORT_ROUTES;
        }
        if !ps.is_empty() && ps.iter().all(|p| !p.upgrades) {
            f |= PORT_NO_UPGRADES;
        }
        f
    };
    let deadline_of = |ps: &[&Policy]| {
        ps.iter()
            .map(|p| policy::nanos(p.first_deadline()))
            .min()
            .unwrap_or(u64::MAX)
    };
    let stream_deadline_of = |ps: &[&Policy]| {
        ps.iter()
            .map(|p| policy::nanos(p.first_stream_deadline()))
            .min()
            .unwrap_or(u64::MAX)
    };
    let names = |ps: &[&Policy]| {
        ps.iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let wild: Vec<&Policy> = cfg.policies.iter().filter(|p| p.ports.is_empty()).collect();
    let mut out = Vec::new();
    if !wild.is_empty() {
        let pc = PortConfig {
            deadline_ns: deadline_of(&wild),
            slot: 0,
            flags: flags_of(&wild),
            stream_deadline_ns: stream_deadline_of(&wild),
        };
        out.push((
            0,
            pc,
            PortLabels {
                policy: names(&wild),
                port: "any".into(),
                route: DEFAULT_ROUTE.into(),
            },
        ));
    }
    let mut ports: Vec<u16> = cfg
        .policies
        .iter()
        .flat_map(|p| p.ports.iter().flat_map(|r| r.first..=r.last))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    for (next_slot, port) in (1..).zip(ports) {
        let ps: Vec<&Policy> = cfg
            .policies
            .iter()
            .filter(|p| p.covers_port(port))
            .collect();
        let slot = if next_slot < MAX_SLOTS { next_slot } else { 0 };
        let label = if slot == 0 {
            PortLabels {
                policy: "*".into(),
                port: OTHER_PORT.into(),
                route: DEFAULT_ROUTE.into(),
            }
        } else {
            PortLabels {
                policy: names(&ps),
                port: port.to_string(),
                route: DEFAULT_ROUTE.into(),
            }
        };
        out.push((
            port,
            PortConfig {
                deadline_ns: deadline_of(&ps),
                slot,
                flags: flags_of(&ps),
                stream_deadline_ns: stream_deadline_of(&ps),
            },
            label,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The labels `apply` derives from a plan (port slots, then route slots).
    fn slot_labels(p: &Plan) -> Vec<SlotLabel> {
        let mut labels = p.route_slots.clone();
        for (_, pc, label) in &p.ports {
            if !labels.iter().any(|l| l.slot == pc.slot) {
                labels.push(SlotLabel {
                    slot: pc.slot,
                    labels: label.clone(),
                });
            }
        }
        labels
    }

    #[test]
    fn the_port_label_takes_only_configured_ports() {
        let cfg = Config::parse(
            r#"
[[policy]]
name = "api"
ports = [8080, "9000-9001"]
budget = "1s"

[[policy]]
name = "all"
budget = "5s"
"#,
            "t",
        )
        .unwrap();
        let slots = slot_labels(&plan(&cfg));
        for port in [8080, 9000, 9001] {
            assert_eq!(port_label(&slots, port), port.to_string());
        }
        // Every other port (the wildcard policy's): one value, however many there are.
        let others: std::collections::HashSet<String> = (1..=u16::MAX)
            .filter(|p| ![8080, 9000, 9001].contains(p))
            .map(|p| port_label(&slots, p))
            .collect();
        assert_eq!(
            others.into_iter().collect::<Vec<_>>(),
            vec![OTHER_PORT.to_string()]
        );
        // A range wider than the slots: at most MAX_SLOTS distinct labels.
        let wide = Config::parse(
            "[[policy]]\nname = \"wide\"\nports = [\"1000-3000\"]\nbudget = \"1s\"\n",
            "t",
        )
        .unwrap();
        let slots = slot_labels(&plan(&wide));
        let labels: std::collections::HashSet<String> =
            (1..=u16::MAX).map(|p| port_label(&slots, p)).collect();
        assert!(labels.len() <= MAX_SLOTS as usize, "{}", labels.len());
        assert!(labels.contains("1000") && labels.contains(OTHER_PORT));
    }

    #[test]
    fn port_plan_takes_the_earliest_deadline_and_keeps_the_wildcard_apart() {
        let cfg = Config::parse(
            r#"
[[policy]]
name = "fast"
ports = [8080]
budget = "1s"
match = { comm = ["a"] }
[[policy]]
name = "slow"
ports = ["8080-8081"]
budget = "5s"
client_gone = { signal = "SIGKILL" }
[[policy]]
name = "rest"
budget = "30s"
match = { comm = ["zzz"] }
"#,
            "t",
        )
        .unwrap();
        let plan = port_plan(&cfg);
        let get = |p: u16| plan.iter().find(|(q, _, _)| *q == p).unwrap();
        assert_eq!(get(0).1.deadline_ns, 30_000_000_000);
        assert_eq!(
            get(8080).1.deadline_ns,
            1_000_000_000,
            "earliest policy on the port"
        );
        assert_eq!(
            get(8080).2.policy,
            "fast,slow,rest",
            "the wildcard policy may apply too"
        );
        assert_eq!(get(8081).1.deadline_ns, 5_000_000_000);
        assert_ne!(get(8080).1.flags & PORT_CLIENT_GONE, 0);
        assert_ne!(get(8080).1.slot, get(8081).1.slot);
    }

    #[test]
    fn routed_ports_get_the_flag_and_entries_at_their_own_index() {
        let cfg = Config::parse(
            r#"
[[policy]]
name = "api"
ports = [8080]
budget = "5s"
routes = [{ path = "/healthz", budget = "1s" }, { method = "GET", path = "/r/*", budget = "off" }]
[[policy]]
name = "other"
ports = [8080]
budget = "3s"
match = { comm = ["x"] }
[[policy]]
name = "any"
budget = "9s"
match = { comm = ["y"] }
routes = [{ path = "/w", budget = "2s" }]
"#,
            "t",
        );
        // Two policies with routes can both apply to 8080 (the wildcard one covers it).
        assert!(cfg.unwrap_err().to_string().contains("one policy"));
        let cfg = Config::parse(
            r#"
[[policy]]
name = "api"
ports = [8080]
budget = "5s"
routes = [{ path = "/healthz", budget = "1s" }, { method = "GET", path = "/r/*", budget = "off" }]
[[policy]]
name = "other"
ports = [8080, 9090]
budget = "3s"
match = { comm = ["x"] }
"#,
            "t",
        )
        .unwrap();
        let p = plan(&cfg);
        let port = |n: u16| p.ports.iter().find(|(q, _, _)| *q == n).unwrap().1;
        assert_ne!(port(8080).flags & PORT_ROUTES, 0);
        assert_eq!(port(9090).flags & PORT_ROUTES, 0);
        // /healthz: 9 method entries; GET /r/*: 1.
        assert_eq!(p.routes.len(), 10);
        assert!(p
            .routes
            .iter()
            .all(|e| e.data[..2] == 8080u16.to_be_bytes()));
        let healthz = p
            .routes
            .iter()
            .find(|e| e.data[3..11] == *b"/healthz")
            .unwrap();
        assert_eq!(healthz.value.deadline_ns, 1_000_000_000);
        let off = p.routes.iter().find(|e| e.data[3..6] == *b"/r/").unwrap();
        // "off" in `api`, but `other` may own the request: the timer fires at its 3 s.
        assert_eq!(off.value.deadline_ns, 3_000_000_000);
        assert_eq!(off.value.flags & watchdog_common::head::ROUTE_OFF, 0);
        assert_eq!(p.route_slots.len(), 2);
        assert_eq!(p.route_slots[1].labels.route, "GET /r/*");
        assert_eq!(p.route_slots[0].slot, MAX_PORT_SLOTS);
    }

    #[test]
    fn answers_go_unread_only_where_every_policy_of_the_port_says_so() {
        let cfg = Config::parse(
            r#"
[[policy]]
name = "rest"
ports = [8080, 9090]
budget = "5s"
upgrades = false
[[policy]]
name = "ws"
ports = [9090]
budget = "3s"
match = { comm = ["x"] }
[[policy]]
name = "default"
ports = [7070]
budget = "3s"
"#,
            "t",
        )
        .unwrap();
        let p = plan(&cfg);
        let port = |n: u16| p.ports.iter().find(|(q, _, _)| *q == n).unwrap().1;
        assert_ne!(port(8080).flags & PORT_NO_UPGRADES, 0);
        // Another policy on 9090 may see upgrades: the kernel keeps looking.
        assert_eq!(port(9090).flags & PORT_NO_UPGRADES, 0);
        assert_eq!(port(7070).flags & PORT_NO_UPGRADES, 0);
    }
}
