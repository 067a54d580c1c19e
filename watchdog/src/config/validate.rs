//! The one place a config is judged: every rule a file must meet, with the file, line and field
//! of what breaks it.

use std::time::Duration;

use super::{
    raw::{RawConfig, RawMysql, RawRoute, RawStep},
    values::PortOrAny,
    Action, BreakerConfig, ClientGone, Config, ConfigError, MysqlAccount, MysqlServer, Policy, Sig,
    Step, Target, DEFAULT_HALF_CLOSE_WINDOW,
};
use crate::routes::{Route, RouteBudget};

/// The "one signal becomes one step" shortcut of policies, client-gone and flags: a ladder of
/// one step at `after` that sends `signal`, or only logs without one.
pub(super) fn one_step(after: Duration, signal: Option<Sig>, target: Target) -> Vec<Step> {
    vec![Step {
        after,
        action: signal.map_or(Action::Log, Action::Signal),
        target,
    }]
}

pub(super) fn validate(raw: RawConfig, origin: &str, text: &str) -> Result<Config, ConfigError> {
    let invalid = |field: String, reason: &str| ConfigError::Invalid {
        path: origin.into(),
        field,
        reason: reason.into(),
    };
    let mut cfg = Config::with_policies(Vec::new());
    if let Some(m) = raw.daemon.mode {
        cfg.mode = m;
    }
    if let Some(a) = raw.daemon.metrics_addr {
        cfg.metrics_addr = a;
    }
    if let Some(p) = raw.daemon.status_socket {
        cfg.status_socket = p;
    }
    if let Some(f) = raw.daemon.log_format {
        cfg.log_format = f;
    }
    cfg.events = raw.daemon.events;
    cfg.probes = raw.daemon.probes.unwrap_or_default();
    if let Some(d) = raw.daemon.state_dir {
        cfg.state_dir = d;
    }
    if let Some(n) = raw.daemon.max_connections {
        cfg.max_connections = n;
    }
    if let Some(k) = raw.daemon.event_buffer_kib {
        cfg.event_buffer_kib = k;
    }
    if let Some(n) = raw.daemon.nice {
        cfg.nice = n;
    }
    if let Some(p) = raw.daemon.acting_priority {
        cfg.acting_priority = p;
    }
    cfg.acting_cpu = raw.daemon.acting_cpu;
    cfg.record_query_string = raw.daemon.record_query_string.unwrap_or(false);
    cfg.stacks = raw.daemon.stacks.unwrap_or(true);
    cfg.native_stacks = raw.daemon.native_stacks.unwrap_or(true);
    if let Some(t) = raw.daemon.stack_timeout {
        if t.0 > Duration::from_secs(1) {
            return Err(invalid(
                "daemon.stack_timeout".into(),
                "at most 1s: the action waits for it",
            ));
        }
        cfg.stack_timeout = t.0;
    }
    if let Some(d) = raw.daemon.kubelet_logs {
        cfg.kubelet_logs = d;
    }
    cfg.on_interrupt = raw.daemon.on_interrupt.unwrap_or_default();
    cfg.check_limits()
        .map_err(|(field, reason)| invalid(format!("daemon.{field}"), &reason))?;
    cfg.protect = raw.protect;
    if raw.policies.is_empty() {
        return Err(invalid(
            "policy".into(),
            "no [[policy]] defined; add at least one",
        ));
    }

    for (i, rp) in raw.policies.into_iter().enumerate() {
        let at = |f: &str| format!("policy[{i}] ({}).{f}", rp.name);
        if rp.name.trim().is_empty() || rp.name.len() > 64 {
            return Err(invalid(
                format!("policy[{i}].name"),
                "must be 1-64 characters",
            ));
        }
        if cfg.policies.iter().any(|p: &Policy| p.name == rp.name) {
            return Err(invalid(at("name"), "another policy has this name"));
        }
        if rp.budget.0.is_zero() {
            return Err(invalid(at("budget"), "must be greater than zero"));
        }
        let target = rp.target.unwrap_or_default();
        let ladder = match (&rp.steps, rp.signal) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    at("signal"),
                    "give either `signal` or `steps`, not both",
                ))
            }
            (Some(s), None) => steps(s, target, &at("steps"), origin)?,
            (None, sig) => one_step(rp.budget.0, sig, target),
        };
        if ladder.is_empty() {
            return Err(invalid(at("steps"), "needs at least one step"));
        }
        if ladder[0].after < rp.budget.0 {
            return Err(invalid(
                at("steps"),
                "the first step comes before the budget is spent",
            ));
        }
        let client_gone = match rp.client_gone {
            None => None,
            Some(cg) => {
                let t = cg.target.unwrap_or(target);
                let steps = match (&cg.steps, cg.signal) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            at("client_gone"),
                            "give either `signal` or `steps`, not both",
                        ))
                    }
                    (Some(s), None) => steps(s, t, &at("client_gone.steps"), origin)?,
                    (None, Some(sig)) => one_step(Duration::ZERO, Some(sig), t),
                    (None, None) => {
                        return Err(invalid(at("client_gone"), "needs `signal` or `steps`"))
                    }
                };
                Some(ClientGone {
                    grace: cg.grace.map_or(Duration::ZERO, |d| d.0),
                    half_close_window: cg
                        .half_close_window
                        .map_or(DEFAULT_HALF_CLOSE_WINDOW, |d| d.0),
                    steps,
                })
            }
        };
        let breaker = match rp.breaker {
            None => BreakerConfig::default(),
            Some(b) => {
                if b.max_actions == 0 || b.window.0.is_zero() {
                    return Err(invalid(
                        at("breaker"),
                        "max_actions and window must be above zero",
                    ));
                }
                BreakerConfig {
                    max_actions: b.max_actions,
                    window: b.window.0,
                    cooldown: b.cooldown.0,
                }
            }
        };
        let any = rp.ports.is_empty() || rp.ports.contains(&PortOrAny::Any);
        let ports = if any {
            vec![]
        } else {
            rp.ports
                .iter()
                .filter_map(|p| match p {
                    PortOrAny::Range(r) => Some(*r),
                    PortOrAny::Any => None,
                })
                .collect()
        };
        let routes = match &rp.routes {
            None => vec![],
            Some(list) => routes(list, &ladder, target, &at("routes"), origin, text)?,
        };
        let policy = Policy {
            name: rp.name.clone(),
            ports,
            budget: rp.budget.0,
            steps: ladder,
            selector: rp.selector,
            mode: rp.mode.unwrap_or(cfg.mode),
            client_gone,
            breaker,
            min_workers: rp.min_workers,
            stacks: rp.stacks.unwrap_or(true),
            upgrades: rp.upgrades.unwrap_or(true),
            routes,
            mysql: match &rp.mysql {
                None => None,
                Some(m) => Some(mysql(m, &at("mysql"), origin, text)?),
            },
        };
        if policy.kills_queries() && policy.mysql.is_none() {
            return Err(invalid(
                at("mysql"),
                "a `kill_query` step needs the account to connect with: mysql = { socket = \"/run/mysqld/mysqld.sock\", user = \"watchdog\", password_file = \"/etc/watchdog/mysql.pass\" }",
            ));
        }
        if let (Some(list), Some(earlier)) = (
            &rp.routes,
            cfg.policies
                .iter()
                .find(|p| !p.routes.is_empty() && p.shares_a_port_with(&policy)),
        ) {
            return Err(ConfigError::InvalidAt {
                path: origin.into(),
                line: line_of(text, list.span().start),
                field: at("routes"),
                reason: format!(
                    "policy {:?} has routes on some of the same ports; a port's routes come from one policy",
                    earlier.name
                ),
            });
        }
        // Overlap rule: policies are tried in file order and the first that matches wins, so a
        // later policy with the same ports and the same selector could never apply: reject it.
        if let Some(earlier) = cfg.policies.iter().find(|p| shadows(p, &policy)) {
            return Err(ConfigError::Invalid {
                path: origin.into(),
                field: at("ports"),
                reason: format!(
                    "policy {:?} comes first with the same processes on these ports, so this one would never apply; \
                     narrow its `match` or its ports",
                    earlier.name
                ),
            });
        }
        cfg.policies.push(policy);
    }
    check_route_tables(&cfg, origin)?;
    Ok(cfg)
}

/// Line (1-based) of a byte offset in the config text.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A policy's `routes`, validated: each gets its ladder (its own `steps`, or the policy's moved
/// to its budget).
fn routes(
    list: &toml::Spanned<Vec<toml::Spanned<RawRoute>>>,
    policy_steps: &[Step],
    target: Target,
    field: &str,
    origin: &str,
    text: &str,
) -> Result<Vec<Route>, ConfigError> {
    if list.get_ref().len() > watchdog_common::limits::MAX_ROUTES as usize {
        return Err(ConfigError::InvalidAt {
            path: origin.into(),
            line: line_of(text, list.span().start),
            field: field.into(),
            reason: format!(
                "{} routes; the kernel's table holds {} in all",
                list.get_ref().len(),
                watchdog_common::limits::MAX_ROUTES
            ),
        });
    }
    let mut out = Vec::new();
    for (i, r) in list.get_ref().iter().enumerate() {
        let at = format!("{field}[{i}]");
        let invalid = |reason: &str| ConfigError::InvalidAt {
            path: origin.into(),
            line: line_of(text, r.span().start),
            field: at.clone(),
            reason: reason.into(),
        };
        let raw = r.get_ref();
        let budget = match raw.budget {
            RouteBudget::Off => None,
            RouteBudget::After(d) => Some(d),
        };
        let steps = match (&raw.steps, budget) {
            (Some(_), None) => return Err(invalid("a route with `budget = \"off\"` has no steps")),
            (Some(s), Some(b)) => {
                let s = steps(s, target, &format!("{at}.steps"), origin)?;
                if s.first().is_none_or(|first| first.after < b) {
                    return Err(invalid(
                        "the first step comes before the route's budget is spent",
                    ));
                }
                s
            }
            (None, Some(b)) => crate::routes::shifted(policy_steps, b),
            (None, None) => vec![],
        };
        out.push(Route {
            method: raw.method,
            pattern: raw.path.clone(),
            budget,
            steps,
        });
    }
    Ok(out)
}

/// Routes over all policies fit the kernel's tables: metrics slots and route-table entries.
fn check_route_tables(cfg: &Config, origin: &str) -> Result<(), ConfigError> {
    use watchdog_common::{
        head::METHODS,
        limits::{MAX_ROUTES, ROUTE_ENTRIES},
    };
    let total: usize = cfg.policies.iter().map(|p| p.routes.len()).sum();
    let entries: usize = cfg
        .policies
        .iter()
        .map(|p| {
            let ports = if p.ports.is_empty() {
                1
            } else {
                p.ports
                    .iter()
                    .map(|r| usize::from(r.last - r.first) + 1)
                    .sum()
            };
            let keys: usize = p
                .routes
                .iter()
                .map(|r| if r.method.is_some() { 1 } else { METHODS.len() })
                .sum();
            ports * keys
        })
        .sum();
    let invalid = |reason: String| ConfigError::Invalid {
        path: origin.into(),
        field: "policy.routes".into(),
        reason,
    };
    if total > MAX_ROUTES as usize {
        return Err(invalid(format!(
            "{total} routes in all; the kernel's table holds {MAX_ROUTES}"
        )));
    }
    if entries > ROUTE_ENTRIES as usize {
        return Err(invalid(format!(
            "routes x ports x methods = {entries} kernel entries; the table holds {ROUTE_ENTRIES} (give routes a `method`, or fewer ports)"
        )));
    }
    Ok(())
}

/// `a` takes every request `b` could: same selector and `a`'s ports include all of `b`'s.
fn shadows(a: &Policy, b: &Policy) -> bool {
    if a.selector != b.selector {
        return false;
    }
    if a.ports.is_empty() {
        return true;
    }
    !b.ports.is_empty()
        && b.ports
            .iter()
            .all(|rb| (rb.first..=rb.last).all(|p| a.ports.iter().any(|ra| ra.contains(p))))
}

pub(super) fn steps(
    raw: &[RawStep],
    default_target: Target,
    field: &str,
    origin: &str,
) -> Result<Vec<Step>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        let invalid = |reason: String| ConfigError::Invalid {
            path: origin.into(),
            field: format!("{field}[{i}]"),
            reason,
        };
        let action = match (s.signal, s.action.as_deref()) {
            (Some(sig), None) => Action::Signal(sig),
            (None, Some("reset")) => Action::Reset,
            (None, Some("log")) => Action::Log,
            (None, Some("kill_query")) => Action::KillQuery,
            (None, Some(other)) => {
                return Err(invalid(format!(
                    "unknown action {other:?}; use \"reset\", \"kill_query\" or \"log\", or give `signal`"
                )))
            }
            (None, None) => return Err(invalid("needs `signal` or `action`".into())),
            (Some(_), Some(_)) => {
                return Err(invalid("give `signal` or `action`, not both".into()))
            }
        };
        if let Some(prev) = out.last().map(|p: &Step| p.after) {
            if s.after.0 < prev {
                return Err(invalid("steps must be in order of `after`".into()));
            }
        }
        out.push(Step {
            after: s.after.0,
            action,
            target: s.target.unwrap_or(default_target),
        });
    }
    Ok(out)
}

/// Largest password file accepted.
const MAX_PASSWORD_BYTES: u64 = 4096;

/// A policy's `mysql` account: one server (socket or address), a user, and a password file that
/// only its owner can read (0600 or stricter), checked as the config file itself is: followed
/// through symlinks (a Kubernetes Secret is a chain of them), a regular file, bounded, readable.
fn mysql(
    m: &toml::Spanned<RawMysql>,
    field: &str,
    origin: &str,
    text: &str,
) -> Result<MysqlAccount, ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let invalid = |f: &str, reason: String| ConfigError::InvalidAt {
        path: origin.into(),
        line: line_of(text, m.span().start),
        field: format!("{field}.{f}"),
        reason,
    };
    let raw = m.get_ref();
    let server = match (&raw.socket, raw.address) {
        (Some(s), None) if s.is_absolute() => MysqlServer::Socket(s.clone()),
        (Some(s), None) => {
            return Err(invalid(
                "socket",
                format!("{} must be an absolute path", s.display()),
            ))
        }
        (None, Some(a)) => MysqlServer::Address(a),
        _ => {
            return Err(invalid(
                "socket",
                "give exactly one of `socket` and `address`".into(),
            ))
        }
    };
    if raw.user.is_empty() || raw.user.len() > 80 {
        return Err(invalid("user", "must be 1-80 characters".into()));
    }
    let p = &raw.password_file;
    let refuse = |reason: String| invalid("password_file", format!("{}: {reason}", p.display()));
    let meta = std::fs::metadata(p).map_err(|e| refuse(e.to_string()))?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(refuse(format!(
            "mode {:04o}: a password must be readable by its owner only; chmod 600 it",
            meta.mode() & 0o7777
        )));
    }
    if meta.len() > MAX_PASSWORD_BYTES {
        return Err(refuse(format!(
            "{} bytes is over the {MAX_PASSWORD_BYTES}-byte limit",
            meta.len()
        )));
    }
    super::read_password(p).map_err(|e| refuse(e.to_string()))?;
    Ok(MysqlAccount {
        server,
        user: raw.user.clone(),
        password_file: p.clone(),
    })
}
