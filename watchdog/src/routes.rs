//! Routes: budgets per endpoint. What a route is in the config, which route a request takes
//! (first match in file order), and the kernel's route table that makes the timer fire at that
//! route's deadline. Pure: no I/O.
//!
//! The kernel looks a request up by longest prefix (an LPM trie keyed by port, method code and
//! path bytes, `watchdog_common::head::route_key`). First-match semantics come from the values:
//! each key's value is the route with the lowest file index among the routes whose key is that
//! key or a prefix of it, which is what first-match gives for every path that key is the
//! longest match of (`tests::kernel_table_agrees_with_first_match`).

use std::{fmt, str::FromStr, time::Duration};

use serde::{de, Deserialize, Deserializer};
use watchdog_common::head::{
    pattern_key, RouteValue, METHODS, ROUTE_KEY_DATA, ROUTE_OFF, ROUTE_PATTERN_MAX,
};

use crate::config::{Dur, Step};

/// An HTTP method a route may name (code = index in `METHODS` + 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Method(pub u8);

impl Method {
    pub fn name(&self) -> &'static str {
        METHODS[usize::from(self.0 - 1)]
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        METHODS
            .iter()
            .position(|m| *m == s)
            .map(|i| Method(i as u8 + 1))
            .ok_or_else(|| {
                format!(
                    "unknown method {s:?}; use one of {} (upper case)",
                    METHODS.join(", ")
                )
            })
    }
}

/// A route's path: exact (`/healthz`) or a prefix ending in `*` (`/reports/*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    /// The path, without the trailing `*` of a prefix.
    pub path: String,
    pub prefix: bool,
}

impl FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, prefix) = match s.strip_suffix('*') {
            Some(p) => (p, true),
            None => (s, false),
        };
        if !path.starts_with('/') {
            return Err(format!("path {s:?} must start with `/`"));
        }
        if path.contains('*') {
            return Err(format!(
                "path {s:?}: `*` may only end a path (a prefix such as \"/reports/*\")"
            ));
        }
        if let Some(c) = path
            .bytes()
            .find(|b| !b.is_ascii_graphic() || matches!(b, b'?' | b'#'))
        {
            return Err(format!(
                "path {s:?}: byte {c:#04x} cannot be in a route path (no spaces, query strings or control bytes; queries are ignored when matching)"
            ));
        }
        if path.len() > ROUTE_PATTERN_MAX {
            return Err(format!(
                "path {s:?} is {} bytes; the kernel matches at most {ROUTE_PATTERN_MAX}",
                path.len()
            ));
        }
        Ok(Pattern {
            path: path.into(),
            prefix,
        })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.path, if self.prefix { "*" } else { "" })
    }
}

/// `budget = "off"` (never enforced) or a duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteBudget {
    Off,
    After(Duration),
}

impl FromStr for RouteBudget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "off" {
            return Ok(RouteBudget::Off);
        }
        let d: Dur = s.parse()?;
        if d.0.is_zero() {
            return Err("a route budget must be above zero (or \"off\")".into());
        }
        Ok(RouteBudget::After(d.0))
    }
}

macro_rules! from_str_de {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(de::Error::custom)
            }
        }
    )*};
}
from_str_de!(Method, Pattern, RouteBudget);

/// A route as validated: which requests, and what budget and ladder they get.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub method: Option<Method>,
    pub pattern: Pattern,
    /// `None`: `budget = "off"`.
    pub budget: Option<Duration>,
    /// The ladder; empty when off. Its first step is at `budget` or later.
    pub steps: Vec<Step>,
}

impl Route {
    /// The route as its label reads in metrics and records: the pattern from the config.
    pub fn label(&self) -> String {
        match self.method {
            Some(m) => format!("{} {}", m.name(), self.pattern),
            None => self.pattern.to_string(),
        }
    }

    /// Does a request with this method code and path take this route? `complete`: the path
    /// ended within the bytes read (otherwise only a prefix pattern can match it).
    pub fn matches(&self, method: u8, path: &[u8], complete: bool) -> bool {
        if self.method.is_some_and(|m| m.0 != method) {
            return false;
        }
        let p = self.pattern.path.as_bytes();
        if self.pattern.prefix {
            path.starts_with(p)
        } else {
            complete && path == p
        }
    }

    /// When the kernel must wake the daemon for this route (`None`: never).
    pub fn first_deadline(&self) -> Option<Duration> {
        self.budget
            .map(|b| self.steps.first().map_or(b, |s| s.after))
    }
}

/// The policy's ladder moved so that its first step falls at `budget`; gaps stay the same.
pub fn shifted(steps: &[Step], budget: Duration) -> Vec<Step> {
    let first = steps.first().map_or(Duration::ZERO, |s| s.after);
    steps
        .iter()
        .map(|s| Step {
            after: budget + (s.after - first),
            ..*s
        })
        .collect()
}

/// The route a request takes: the first in file order that matches.
pub fn first_match(routes: &[Route], method: u8, path: &[u8], complete: bool) -> Option<usize> {
    routes
        .iter()
        .position(|r| r.matches(method, path, complete))
}

/// Method codes a route's kernel entries are written for.
fn codes(r: &Route) -> Vec<u8> {
    match r.method {
        Some(m) => vec![m.0],
        None => (1..=METHODS.len() as u8).collect(),
    }
}

/// One entry of the kernel's route table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub bits: u32,
    pub data: [u8; ROUTE_KEY_DATA],
    pub value: RouteValue,
}

/// The kernel's route table for one port index (0 = the wildcard entry).
///
/// `routes` are the routes of the one policy on the port that has routes; `slots[i]` is route
/// `i`'s metrics slot. `others` is the earliest first step of the port's other policies: a
/// request's timer must fire for whichever policy ends up owning it, so each value's deadline is
/// the earliest of the route's and `others`; the daemon times the rest.
pub fn table(port: u16, routes: &[Route], slots: &[u32], others: Option<Duration>) -> Vec<Entry> {
    let mut keys: Vec<(u32, [u8; ROUTE_KEY_DATA], u8)> = Vec::new();
    for r in routes {
        for code in codes(r) {
            let (bits, data) = pattern_key(port, code, r.pattern.path.as_bytes(), r.pattern.prefix)
                .expect("patterns are checked against the key size when the config is read");
            if !keys.iter().any(|(b, d, _)| *b == bits && *d == data) {
                keys.push((bits, data, code));
            }
        }
    }
    keys.into_iter()
        .map(|(bits, data, code)| {
            // The routes that key matches: those whose key is it or a prefix of it.
            let first = routes
                .iter()
                .position(|r| {
                    codes(r).contains(&code) && {
                        let (rb, rd) =
                            pattern_key(port, code, r.pattern.path.as_bytes(), r.pattern.prefix)
                                .expect("checked at load");
                        rb <= bits && prefix_eq(&rd, &data, rb)
                    }
                })
                .expect("a key always matches the route it came from");
            let own = routes[first].first_deadline();
            let deadline = match (own, others) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            Entry {
                bits,
                data,
                value: RouteValue {
                    deadline_ns: deadline.map_or(0, nanos),
                    slot: slots[first],
                    flags: if deadline.is_none() { ROUTE_OFF } else { 0 },
                },
            }
        })
        .collect()
}

/// A duration in nanoseconds, saturating (as `policy::nanos`; this module stands alone so
/// the config fuzz target can include it).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Are the first `bits` bits of `a` and `b` the same? (`bits` is a whole number of bytes here.)
fn prefix_eq(a: &[u8], b: &[u8], bits: u32) -> bool {
    let n = (bits / 8) as usize;
    a[..n] == b[..n]
}

/// The kernel's lookup, in userspace: the value of the longest entry that is a prefix of the
/// request key (`bits` long).
#[cfg(test)]
pub fn lookup(entries: &[Entry], bits: u32, data: &[u8; ROUTE_KEY_DATA]) -> Option<RouteValue> {
    entries
        .iter()
        .filter(|e| e.bits <= bits && prefix_eq(&e.data, data, e.bits))
        .max_by_key(|e| e.bits)
        .map(|e| e.value)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use watchdog_common::head::{route_key, KeyOutcome, HEAD_BYTES};

    use super::*;
    use crate::config::{Action, Target};

    fn route(method: Option<u8>, pattern: &str, budget_ms: Option<u64>) -> Route {
        let budget = budget_ms.map(Duration::from_millis);
        Route {
            method: method.map(Method),
            pattern: pattern.parse().unwrap(),
            budget,
            steps: budget
                .map(|b| {
                    vec![Step {
                        after: b,
                        action: Action::Log,
                        target: Target::Process,
                    }]
                })
                .unwrap_or_default(),
        }
    }

    #[test]
    fn patterns_are_exact_or_a_trailing_prefix() {
        assert!("/a/*".parse::<Pattern>().unwrap().prefix);
        assert!(!"/healthz".parse::<Pattern>().unwrap().prefix);
        assert!("/a/*/b"
            .parse::<Pattern>()
            .unwrap_err()
            .contains("`*` may only end"));
        assert!("healthz".parse::<Pattern>().is_err());
        assert!("/a?b=1".parse::<Pattern>().is_err());
        assert!("/a b".parse::<Pattern>().is_err());
        let long = format!("/{}", "a".repeat(ROUTE_PATTERN_MAX));
        assert!(long.parse::<Pattern>().unwrap_err().contains("at most"));
        assert!("get".parse::<Method>().is_err());
        assert_eq!("PATCH".parse::<Method>().unwrap().name(), "PATCH");
        assert_eq!("off".parse::<RouteBudget>().unwrap(), RouteBudget::Off);
    }

    #[test]
    fn first_match_in_file_order_with_methods_and_exact_paths() {
        let routes = vec![
            route(None, "/reports/*", Some(60_000)),
            route(Some(3), "/upload/*", Some(120_000)),
            route(None, "/healthz", Some(1_000)),
            route(None, "/reports/fast", Some(1)),
        ];
        assert_eq!(first_match(&routes, 1, b"/reports/2024", true), Some(0));
        assert_eq!(
            first_match(&routes, 1, b"/reports/fast", true),
            Some(0),
            "shadowed"
        );
        assert_eq!(first_match(&routes, 3, b"/upload/x", true), Some(1));
        assert_eq!(
            first_match(&routes, 1, b"/upload/x", true),
            None,
            "GET is not POST"
        );
        assert_eq!(first_match(&routes, 1, b"/healthz", true), Some(2));
        assert_eq!(first_match(&routes, 1, b"/healthzz", true), None);
        assert_eq!(
            first_match(&routes, 1, b"/healthz", false),
            None,
            "longer than read"
        );
    }

    #[test]
    fn a_route_budget_moves_the_ladder_and_keeps_its_gaps() {
        let s = |ms| Step {
            after: Duration::from_millis(ms),
            action: Action::Log,
            target: Target::Process,
        };
        let moved = shifted(&[s(5_000), s(6_000), s(9_000)], Duration::from_secs(60));
        let at: Vec<u64> = moved.iter().map(|s| s.after.as_millis() as u64).collect();
        assert_eq!(at, vec![60_000, 61_000, 64_000]);
    }

    const EXAMPLE: &str = r#"
[[policy]]
name = "api"
ports = [8080]
budget = "5s"
steps = [{ after = "5s", signal = "SIGTERM" }, { after = "7s", signal = "SIGKILL" }]
routes = [
  { path = "/reports/*", budget = "60s" },
  { method = "POST", path = "/upload/*", budget = "2m" },
  { path = "/v1/stream/*", budget = "off" },   # never enforced
  { path = "/healthz", budget = "1s", steps = [{ after = "1s", signal = "SIGKILL" }] },
]
"#;

    #[test]
    fn the_documented_routes_parse_with_their_ladders() {
        let cfg = crate::config::Config::parse(EXAMPLE, "f.toml").unwrap();
        let p = &cfg.policies[0];
        let at = |i: usize| -> Vec<u64> {
            p.routes[i]
                .steps
                .iter()
                .map(|s| s.after.as_secs())
                .collect()
        };
        assert_eq!(at(0), vec![60, 62], "moved to the route's budget, same gap");
        assert_eq!(at(1), vec![120, 122]);
        assert_eq!(p.routes[2].budget, None);
        assert!(p.ladder_for(Some(2)).is_none());
        assert_eq!(at(3), vec![1]);
        assert_eq!(p.routes[1].label(), "POST /upload/*");
        assert_eq!(p.ladder_for(None).unwrap().0, Duration::from_secs(5));
    }

    #[test]
    fn bad_routes_are_refused_naming_file_line_and_field() {
        let policy = |routes: &str| {
            format!("[[policy]]\nname = \"a\"\nports = [80]\nbudget = \"2s\"\nroutes = [\n{routes}\n]\n")
        };
        let err = |routes: &str| {
            crate::config::Config::parse(&policy(routes), "f.toml")
                .unwrap_err()
                .to_string()
        };
        let cases = [
            (
                r#"{ path = "/a", budget = "1s", colour = 1 },"#,
                "unknown field `colour`",
            ),
            (
                r#"{ method = "get", path = "/a", budget = "1s" },"#,
                "unknown method \"get\"",
            ),
            (
                r#"{ path = "/a/*/b", budget = "1s" },"#,
                "may only end a path",
            ),
            (r#"{ path = "/a", budget = "0s" },"#, "above zero"),
            (
                r#"{ path = "/a", budget = "off", steps = [{ after = "1s", signal = "KILL" }] },"#,
                "has no steps",
            ),
            (
                r#"{ path = "/a", budget = "2s", steps = [{ after = "1s", signal = "KILL" }] },"#,
                "before the route's budget",
            ),
        ];
        for (route, want) in cases {
            let e = err(&format!(
                "  {{ path = \"/ok\", budget = \"1s\" }},\n  {route}"
            ));
            assert!(
                e.contains("f.toml") && e.contains("line 7") && e.contains(want),
                "{route}: {e}"
            );
        }
        let long = format!(
            "  {{ path = \"/{}\", budget = \"1s\" }},",
            "a".repeat(ROUTE_PATTERN_MAX)
        );
        let e = err(&long);
        assert!(e.contains("line 6") && e.contains("at most"), "{e}");
        let many: String = (0..=watchdog_common::limits::MAX_ROUTES)
            .map(|i| format!("  {{ path = \"/r{i}\", budget = \"1s\" }},\n"))
            .collect();
        let e = err(&many);
        assert!(
            e.contains("line 5") && e.contains("routes") && e.contains("holds"),
            "{e}"
        );
        let two = format!(
            "{}[[policy]]\nname = \"b\"\nports = [\"70-90\"]\nbudget = \"2s\"\nmatch = {{ comm = [\"x\"] }}\nroutes = [{{ path = \"/b\", budget = \"1s\" }}]\n",
            policy(r#"{ path = "/a", budget = "1s" },"#)
        );
        let e = crate::config::Config::parse(&two, "f.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 13") && e.contains("one policy"), "{e}");
    }

    fn request_key(port: u16, line: &[u8]) -> Option<(u32, [u8; ROUTE_KEY_DATA])> {
        let mut head = [0u8; HEAD_BYTES];
        let n = line.len().min(HEAD_BYTES);
        head[..n].copy_from_slice(&line[..n]);
        let mut data = [0u8; ROUTE_KEY_DATA];
        match route_key(port, &head, n, &mut data) {
            KeyOutcome::Key(bits) => Some((bits, data)),
            _ => None,
        }
    }

    fn arb_route() -> impl Strategy<Value = Route> {
        (
            proptest::option::of(1u8..=3),
            "/[ab]{0,3}",
            any::<bool>(),
            proptest::option::of(1u64..50),
        )
            .prop_map(|(m, path, prefix, b)| {
                let pattern = if prefix { format!("{path}*") } else { path };
                route(m, &pattern, b.map(|b| b * 100))
            })
    }

    proptest! {
        /// Both directions: the kernel's table gives a request the deadline and slot of the
        /// route first-match picks, and none (the port's default) when no route matches.
        #[test]
        fn kernel_table_agrees_with_first_match(
            routes in proptest::collection::vec(arb_route(), 1..8),
            method in 1u8..=3,
            path in "/[ab]{0,5}",
            query in any::<bool>(),
            others in proptest::option::of(1u64..5_000),
        ) {
            let slots: Vec<u32> = (0..routes.len() as u32).map(|i| 64 + i).collect();
            let others = others.map(Duration::from_millis);
            let entries = table(8080, &routes, &slots, others);
            let line = format!(
                "{} {path}{} HTTP/1.1\r\n",
                METHODS[usize::from(method - 1)],
                if query { "?a=*" } else { "" }
            );
            let (bits, data) = request_key(8080, line.as_bytes()).unwrap();
            let got = lookup(&entries, bits, &data);
            match first_match(&routes, method, path.as_bytes(), true) {
                Some(i) => {
                    let v = got.expect("a matching route must be in the kernel's table");
                    prop_assert_eq!(v.slot, slots[i]);
                    let want = match (routes[i].first_deadline(), others) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    prop_assert_eq!(v.flags & ROUTE_OFF != 0, want.is_none());
                    prop_assert_eq!(v.deadline_ns, want.map_or(0, nanos));
                }
                None => prop_assert_eq!(got, None),
            }
            // Another port's requests never see this port's routes.
            let (bits, data) = request_key(8081, line.as_bytes()).unwrap();
            prop_assert_eq!(lookup(&entries, bits, &data), None);
        }
    }
}
