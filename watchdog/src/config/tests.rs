//! Parser and validation tests of the config.

use nix::sys::signal::Signal;

use super::*;

const EXAMPLE: &str = r#"
[daemon]
mode = "enforce"

[protect]
comm = ["postgres"]

[[policy]]
name = "api"
ports = [8080, "9000-9010"]
budget = "30s"
target = "process"
match = { pids = [1234], comm = ["gunicorn"], exe = ["/usr/bin/python3*"], cgroup = ["/kubepods/*"] }
mode = "enforce"
steps = [
  { after = "30s", signal = "SIGUSR1", target = "thread" },
  { after = "35s", signal = "SIGTERM" },
  { after = "40s", signal = "SIGKILL" },
  { after = "40s", action = "reset" },
]
client_gone = { grace = "50ms", signal = "SIGKILL" }
breaker = { max_actions = 5, window = "10s", cooldown = "1m" }
"#;

#[test]
fn parses_the_documented_example() {
    let cfg = Config::parse(EXAMPLE, "example").unwrap();
    let p = &cfg.policies[0];
    assert_eq!(
        p.ports,
        vec![
            PortRange {
                first: 8080,
                last: 8080
            },
            PortRange {
                first: 9000,
                last: 9010
            }
        ]
    );
    assert_eq!(p.steps.len(), 4);
    assert_eq!(p.steps[0].target, Target::Thread);
    assert_eq!(p.steps[1].target, Target::Process);
    assert_eq!(p.steps[2].action, Action::Signal(Sig(Signal::SIGKILL)));
    assert_eq!(p.steps[3].action, Action::Reset);
    assert_eq!(p.first_deadline(), Duration::from_secs(30));
    assert_eq!(
        p.client_gone.as_ref().unwrap().grace,
        Duration::from_millis(50)
    );
    assert_eq!(p.breaker.max_actions, 5);
    assert!(p.covers_port(9005) && !p.covers_port(9011));
}

#[test]
fn errors_name_line_and_field() {
    let e = Config::parse("[[policy]]\nname = \"a\"\nbudget = \"2x\"\n", "f.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("f.toml") && e.contains("line 3") && e.contains("invalid duration"),
        "{e}"
    );
    let e = Config::parse(
        "[[policy]]\nname = \"a\"\nbudget = \"2s\"\nsignal = \"SIGFOO\"\n",
        "f.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("line 4") && e.contains("unknown signal"), "{e}");
    let e = Config::parse(
        "[[policy]]\nname = \"a\"\nbudget = \"2s\"\nbugdet = 1\n",
        "f.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown field") && e.contains("bugdet"), "{e}");
    let e = Config::parse(
        "[[policy]]\nname = \"a\"\nbudget = \"2s\"\nports = [70000]\n",
        "f.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("ports are 1-65535"), "{e}");
    let e = Config::parse("[[policy]]\nname = \"a\"\nbudget = \"0s\"\n", "f.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("budget") && e.contains("greater than zero"),
        "{e}"
    );
}

#[test]
fn rejects_shadowed_policies_and_allows_narrowed_ones() {
    let two = |m2: &str| {
        format!(
            "[[policy]]\nname = \"a\"\nports = [8080]\nbudget = \"1s\"\n\
             [[policy]]\nname = \"b\"\nports = [8080]\nbudget = \"2s\"\n{m2}"
        )
    };
    let e = Config::parse(&two(""), "f").unwrap_err().to_string();
    assert!(e.contains("would never apply"), "{e}");
    assert!(Config::parse(&two("match = { comm = [\"x\"] }\n"), "f").is_ok());
}

#[test]
fn kubernetes_names_and_daemon_keys() {
    let cfg = Config::parse(
        "[daemon]\nkubelet_logs = \"/tmp/k\"\non_interrupt = \"keep\"\n\
         [protect]\nnamespace = [\"kube-system\"]\n\
         [[policy]]\nname = \"a\"\nbudget = \"1s\"\n\
         match = { namespace = [\"payments\"], pod = [\"api-*\"], container = [\"app\"] }\n",
        "f",
    )
    .unwrap();
    assert_eq!(cfg.kubelet_logs, PathBuf::from("/tmp/k"));
    assert_eq!(cfg.on_interrupt, OnInterrupt::Keep);
    assert!(!cfg.protect.is_empty());
    let sel = &cfg.policies[0].selector;
    assert_eq!(sel.namespace[0].0.as_str(), "payments");
    assert!(sel.pod[0].0.matches("api-7d9f8-x2x4q"));
    assert_eq!(sel.container[0].0.as_str(), "app");
    let d = Config::parse("[[policy]]\nname = \"a\"\nbudget = \"1s\"\n", "f").unwrap();
    assert_eq!(
        d.on_interrupt,
        OnInterrupt::Unload,
        "Ctrl-C leaves nothing by default"
    );
    assert_eq!(d.kubelet_logs, PathBuf::from("/var/log"));
    let e = Config::parse(
        "[daemon]\nkubelet_logs = \"var/log\"\n[[policy]]\nname = \"a\"\nbudget = \"1s\"\n",
        "f",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("kubelet_logs") && e.contains("absolute"), "{e}");
}

#[test]
fn signals_by_name_and_number() {
    assert_eq!("SIGKILL".parse::<Sig>().unwrap().0, Signal::SIGKILL);
    assert_eq!("term".parse::<Sig>().unwrap().0, Signal::SIGTERM);
    assert_eq!("2".parse::<Sig>().unwrap().0, Signal::SIGINT);
    assert!("SIGNOPE".parse::<Sig>().is_err());
    assert!("0".parse::<Sig>().is_err());
}

#[test]
fn durations_and_ports() {
    assert_eq!(
        "250ms".parse::<Dur>().unwrap().0,
        Duration::from_millis(250)
    );
    assert_eq!("1m".parse::<Dur>().unwrap().0, Duration::from_secs(60));
    assert!("fast".parse::<Dur>().is_err());
    assert_eq!(
        "9000-9010".parse::<PortRange>().unwrap(),
        PortRange {
            first: 9000,
            last: 9010
        }
    );
    assert!("0".parse::<PortRange>().is_err());
    assert!("10-5".parse::<PortRange>().is_err());
}

proptest::proptest! {
    #[test]
    fn port_range_parse_roundtrip(a in 1u16.., b in 1u16..) {
        let (lo, hi) = (a.min(b), a.max(b));
        let r: PortRange = format!("{lo}-{hi}").parse().unwrap();
        proptest::prop_assert_eq!(r, PortRange { first: lo, last: hi });
    }

    #[test]
    fn duration_parse_never_panics(s in "\\PC{0,20}") {
        let _ = s.parse::<Dur>();
    }

    #[test]
    fn config_parse_never_panics(s in "\\PC{0,200}") {
        let _ = Config::parse(&s, "fuzz");
    }

    #[test]
    fn signal_and_port_parsers_never_panic(s in "\\PC{0,24}") {
        let _ = s.parse::<Sig>();
        let _ = s.parse::<PortRange>();
    }

    #[test]
    fn milliseconds_parse_to_themselves(n in 0u64..10_000_000) {
        proptest::prop_assert_eq!(
            format!("{n}ms").parse::<Dur>().unwrap().0,
            Duration::from_millis(n)
        );
    }

    /// Every signal nix knows parses by name, by short name and by number, to itself.
    #[test]
    fn signal_names_and_numbers_agree(i in 0usize..31) {
        let sig = Signal::iterator().nth(i).unwrap();
        let by_name: Sig = sig.as_str().parse().unwrap();
        let by_short: Sig = sig.as_str().trim_start_matches("SIG").parse().unwrap();
        let by_number: Sig = (sig as i32).to_string().parse().unwrap();
        proptest::prop_assert_eq!(by_name.0, sig);
        proptest::prop_assert_eq!(by_short.0, sig);
        proptest::prop_assert_eq!(by_number.0, sig);
    }

    #[test]
    fn reversed_zero_and_out_of_range_ports_are_refused(a in 1u32..70_000, b in 1u32..70_000) {
        let parsed = format!("{a}-{b}").parse::<PortRange>();
        proptest::prop_assert_eq!(parsed.is_ok(), a <= b && b <= 65_535);
        let zero = format!("0-{b}");
        proptest::prop_assert!(zero.parse::<PortRange>().is_err());
    }

    /// A generated policy file parses back to the values written.
    #[test]
    fn generated_policy_round_trips(
        name in "[a-z][a-z0-9-]{0,20}",
        budget_ms in 1u64..3_600_000,
        lo in 1u16..60_000,
        span in 0u16..5_000,
        observe in proptest::bool::ANY,
    ) {
        let hi = lo.saturating_add(span);
        let mode = if observe { "observe" } else { "enforce" };
        let text = format!(
            "[daemon]\nmode = \"{mode}\"\n[[policy]]\nname = \"{name}\"\nports = [\"{lo}-{hi}\"]\nbudget = \"{budget_ms}ms\"\nsignal = \"SIGTERM\"\n"
        );
        let cfg = Config::parse(&text, "generated").unwrap();
        proptest::prop_assert_eq!(cfg.mode == Mode::Observe, observe);
        let p = &cfg.policies[0];
        proptest::prop_assert_eq!(&p.name, &name);
        proptest::prop_assert_eq!(p.budget, Duration::from_millis(budget_ms));
        proptest::prop_assert_eq!(&p.ports, &vec![PortRange { first: lo, last: hi }]);
        proptest::prop_assert!(p.covers_port(lo) && p.covers_port(hi));
    }
}
