//! Signals that do harm to the server a policy selects (`watchdog check --config` warns): a
//! server whose own handler for that signal is not "stop this request". Pure: from the config
//! alone, by the policy's `comm` and `exe` globs (server-models.md has the sources).

use nix::sys::signal::Signal;

use crate::config::{Action, Glob, Policy};

/// One server whose own reaction to some signals is worse than what a policy means by them.
struct Harmful {
    /// Process names (`comm`) and executable base names it runs as.
    names: &'static [&'static str],
    signals: &'static [Signal],
    /// What the signal does to it.
    why: &'static str,
}

const HARMFUL: &[Harmful] = &[
    Harmful {
        names: &["node", "nodejs"],
        signals: &[Signal::SIGUSR1],
        why: "SIGUSR1 starts Node's inspector (a debugger listening on 127.0.0.1:9229); the request runs on",
    },
    Harmful {
        names: &["mysqld", "mariadbd"],
        signals: &[Signal::SIGTERM, Signal::SIGINT],
        why: "SIGTERM/SIGINT shut the whole database server down, every connection with it; cancel one query with KILL QUERY",
    },
    Harmful {
        names: &["redis-server"],
        signals: &[Signal::SIGTERM, Signal::SIGINT],
        why: "SIGTERM/SIGINT shut Redis down after the current command; a slow script stops with SCRIPT KILL",
    },
    Harmful {
        names: &["gunicorn"],
        signals: &[Signal::SIGHUP, Signal::SIGUSR2],
        why: "gunicorn workers reset SIGHUP/SIGUSR2 to the default action: the signal kills the worker and every request in it (use SIGTERM for a drain, SIGKILL if a kill is meant)",
    },
];

/// Directories an executable of one of those servers is commonly found in; an `exe` glob is
/// also tried with the server's name in the glob's own literal directory.
const BIN_DIRS: &[&str] = &[
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/bin",
    "/sbin",
    "/opt/bin",
];

/// A warning: `policy`'s step sends `signal`, and its match selects `server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub policy: String,
    pub signal: Signal,
    pub server: &'static str,
    /// `comm "node*"` or `exe "/usr/bin/node"`: the selector that picks it.
    pub by: String,
    pub why: &'static str,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "policy {:?} sends {} and its match selects {} ({}): {}",
            self.policy,
            self.signal.as_str(),
            self.server,
            self.by,
            self.why
        )
    }
}

/// Every signal a policy's ladders can send: its steps, its routes' steps, client-gone's.
fn signals(p: &Policy) -> Vec<Signal> {
    let mut out: Vec<Signal> = p
        .steps
        .iter()
        .chain(p.routes.iter().flat_map(|r| r.steps.iter()))
        .chain(p.client_gone.iter().flat_map(|c| c.steps.iter()))
        .filter_map(|s| match s.action {
            Action::Signal(sig) => Some(sig.0),
            Action::Reset | Action::Log | Action::KillQuery => None,
        })
        .collect();
    out.sort_by_key(|s| *s as i32);
    out.dedup();
    out
}

/// The selector of `p` that picks a process named `name`, if one does.
fn selected_by(p: &Policy, name: &str) -> Option<String> {
    if let Some(g) = p.selector.comm.iter().find(|g| g.0.matches(name)) {
        return Some(format!("comm {:?}", g.0.as_str()));
    }
    p.selector
        .exe
        .iter()
        .find(|g| exe_paths(g, name).iter().any(|path| g.0.matches(path)))
        .map(|g| format!("exe {:?}", g.0.as_str()))
}

/// Paths the executable `name` may have, for the glob `g`: the usual directories, and the
/// glob's own directory when it is literal (`/opt/node/bin/node*` -> `/opt/node/bin/node`).
fn exe_paths(g: &Glob, name: &str) -> Vec<String> {
    let mut out: Vec<String> = BIN_DIRS.iter().map(|d| format!("{d}/{name}")).collect();
    if let Some((dir, _)) = g.0.as_str().rsplit_once('/') {
        if !dir.contains(['*', '?', '[']) {
            out.push(format!("{dir}/{name}"));
        }
    }
    out
}

/// Warnings for every policy whose `comm` or `exe` selects a server that one of its signals
/// harms. A policy with neither key selects by other means (pids, cgroups, pods): nothing is
/// known about its processes from the config, so it gets none.
pub fn warnings(policies: &[Policy]) -> Vec<Warning> {
    let mut out = Vec::new();
    for p in policies {
        let sent = signals(p);
        for h in HARMFUL {
            for sig in h.signals.iter().filter(|s| sent.contains(s)) {
                if let Some((server, by)) = h
                    .names
                    .iter()
                    .find_map(|n| selected_by(p, n).map(|by| (*n, by)))
                {
                    out.push(Warning {
                        policy: p.name.clone(),
                        signal: *sig,
                        server,
                        by,
                        why: h.why,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn warn(toml: &str) -> Vec<Warning> {
        warnings(&Config::parse(toml, "test.toml").unwrap().policies)
    }

    fn policy(matcher: &str, steps: &str) -> String {
        format!(
            "[[policy]]\nname = \"p\"\nports = [8080]\nbudget = \"1s\"\nmatch = {{ {matcher} }}\n\
             steps = [{steps}]\n"
        )
    }

    #[test]
    fn sigusr1_to_node_by_comm_or_exe_warns() {
        for m in [
            r#"comm = ["node"]"#,
            r#"comm = ["no*"]"#,
            r#"exe = ["/usr/bin/node"]"#,
            r#"exe = ["*/node"]"#,
            r#"exe = ["/home/app/.nvm/versions/node/v20/bin/node"]"#,
        ] {
            let w = warn(&policy(m, r#"{ after = "1s", signal = "SIGUSR1" }"#));
            assert_eq!(w.len(), 1, "{m}: {w:?}");
            assert_eq!(w[0].signal, Signal::SIGUSR1);
            assert!(w[0].to_string().contains("inspector"), "{}", w[0]);
        }
    }

    #[test]
    fn term_and_int_to_databases_warn_once_per_signal() {
        let w = warn(&policy(
            r#"comm = ["mariadbd", "redis-server"]"#,
            r#"{ after = "1s", signal = "SIGINT" }, { after = "2s", signal = "SIGTERM" }"#,
        ));
        let got: Vec<(&str, Signal)> = w.iter().map(|w| (w.server, w.signal)).collect();
        assert_eq!(
            got,
            [
                ("mariadbd", Signal::SIGTERM),
                ("mariadbd", Signal::SIGINT),
                ("redis-server", Signal::SIGTERM),
                ("redis-server", Signal::SIGINT),
            ]
        );
        let mysql = warn(&policy(
            r#"exe = ["/usr/sbin/mysqld"]"#,
            r#"{ after = "1s", signal = "SIGTERM" }"#,
        ));
        assert_eq!(mysql.len(), 1);
        assert!(mysql[0].to_string().contains("KILL QUERY"), "{}", mysql[0]);
    }

    #[test]
    fn hup_and_usr2_to_gunicorn_say_the_worker_dies() {
        for sig in ["SIGHUP", "SIGUSR2"] {
            let w = warn(&policy(
                r#"comm = ["gunicorn"]"#,
                &format!(r#"{{ after = "1s", signal = "{sig}" }}"#),
            ));
            assert_eq!(w.len(), 1, "{sig}");
            assert!(w[0].to_string().contains("kills the worker"), "{}", w[0]);
        }
    }

    #[test]
    fn client_gone_and_route_steps_count_too() {
        let w = warn(
            "[[policy]]\nname = \"p\"\nports = [8080]\nbudget = \"1s\"\n\
             match = { comm = [\"node\"] }\nclient_gone = { signal = \"SIGUSR1\" }\n",
        );
        assert_eq!(w.len(), 1, "{w:?}");
        let w = warn(
            "[[policy]]\nname = \"p\"\nports = [8080]\nbudget = \"1s\"\n\
             match = { comm = [\"node\"] }\n\
             routes = [{ path = \"/a\", budget = \"2s\", steps = [{ after = \"2s\", signal = \"SIGUSR1\" }] }]\n",
        );
        assert_eq!(w.len(), 1, "{w:?}");
    }

    #[test]
    fn harmless_combinations_do_not_warn() {
        for (m, steps) in [
            // The right tools for each server.
            (
                r#"comm = ["node"]"#,
                r#"{ after = "1s", action = "reset" }"#,
            ),
            (
                r#"comm = ["node"]"#,
                r#"{ after = "1s", signal = "SIGKILL" }"#,
            ),
            (
                r#"comm = ["gunicorn"]"#,
                r#"{ after = "1s", signal = "SIGTERM" }, { after = "2s", signal = "SIGKILL" }"#,
            ),
            (
                r#"comm = ["mariadbd"]"#,
                r#"{ after = "1s", action = "reset" }"#,
            ),
            (
                r#"comm = ["postgres"]"#,
                r#"{ after = "1s", signal = "SIGINT" }"#,
            ),
            // Harmful signals, but the match selects other servers.
            (
                r#"comm = ["python3"]"#,
                r#"{ after = "1s", signal = "SIGUSR1" }"#,
            ),
            (
                r#"comm = ["nodemon-like"]"#,
                r#"{ after = "1s", signal = "SIGUSR1" }"#,
            ),
            (
                r#"exe = ["/usr/bin/python3*"]"#,
                r#"{ after = "1s", signal = "SIGTERM" }"#,
            ),
            (
                r#"exe = ["/opt/app/bin/*.sh"]"#,
                r#"{ after = "1s", signal = "SIGHUP" }"#,
            ),
            // Selected by other keys: nothing is known of the process.
            (
                r#"cgroup = ["*node*"]"#,
                r#"{ after = "1s", signal = "SIGUSR1" }"#,
            ),
            (r#"pids = [1]"#, r#"{ after = "1s", signal = "SIGTERM" }"#),
        ] {
            let w = warn(&policy(m, steps));
            assert!(w.is_empty(), "{m} / {steps}: {w:?}");
        }
    }

    proptest::proptest! {
        /// Whatever the ladder, a warning names a signal the policy really sends, and a
        /// ladder of only reset/log/SIGKILL never warns.
        #[test]
        fn warnings_only_for_signals_sent(sigs in proptest::collection::vec(1i32..32, 1..4)) {
            let steps: Vec<String> = sigs
                .iter()
                .enumerate()
                .filter(|(_, n)| Signal::try_from(**n).is_ok())
                .map(|(i, n)| format!(r#"{{ after = "{}s", signal = {n} }}"#, i + 1))
                .collect();
            proptest::prop_assume!(!steps.is_empty());
            let w = warn(&policy(
                r#"comm = ["node", "mysqld", "gunicorn", "redis-server"]"#,
                &steps.join(", "),
            ));
            for x in &w {
                proptest::prop_assert!(sigs.contains(&(x.signal as i32)), "{x}");
            }
            let harmless = sigs.iter().all(|n| {
                ![libc::SIGUSR1, libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR2]
                    .contains(n)
            });
            proptest::prop_assert_eq!(harmless, w.is_empty());
        }
    }
}
