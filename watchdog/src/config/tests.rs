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
fn stacks_are_on_by_default_and_can_be_turned_off() {
    let policy = "[[policy]]\nname = \"a\"\nbudget = \"1s\"\n";
    let d = Config::parse(policy, "f").unwrap();
    assert!(d.stacks && d.native_stacks && d.policies[0].stacks);
    assert_eq!(d.stack_timeout, Duration::from_millis(20));
    assert!(Config::with_policies(vec![]).stacks, "the command line too");
    let off = Config::parse(&format!("[daemon]\nstacks = false\n{policy}"), "f").unwrap();
    assert!(!off.stacks);
    let python_only =
        Config::parse(&format!("[daemon]\nnative_stacks = false\n{policy}"), "f").unwrap();
    assert!(python_only.stacks && !python_only.native_stacks);
    let per_policy = Config::parse(&format!("{policy}stacks = false\n"), "f").unwrap();
    assert!(per_policy.stacks && !per_policy.policies[0].stacks);
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

    /// TOML-shaped files (real tables and keys, values good, bad and of the wrong type)
    /// never panic, and every refusal names its origin: the parser and the validation
    /// behind it are both reached (see `toml_shaped_input_reaches_validation`).
    #[test]
    fn toml_shaped_config_never_panics(text in toml_shaped()) {
        if let Err(e) = Config::parse(&text, "generated.toml") {
            proptest::prop_assert!(e.to_string().contains("generated.toml"), "{}\n{}", e, text);
        }
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

/// `key = value` for one key of a table: mostly a value of the right kind, sometimes a bad
/// one (wrong type, bad unit, unknown name), sometimes an arbitrary string.
fn toml_entry(key: &'static str) -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let good: &[&str] = match key {
        "mode" => &["\"observe\"", "\"enforce\""],
        "probes" => &["\"auto\"", "\"sock\"", "\"syscalls\""],
        "on_interrupt" => &["\"unload\"", "\"keep\""],
        "record_query_string" => &["true", "false"],
        "nice" => &["-20", "0", "5"],
        "acting_priority" => &["0", "10", "49"],
        "acting_cpu" => &["0", "1"],
        "metrics_addr" => &["\"127.0.0.1:9477\""],
        "comm" | "exe" | "namespace" | "cgroup" => {
            &["[\"gunicorn\"]", "[\"python3*\"]", "[\"/kubepods/*\"]"]
        }
        "pids" => &["[1234]"],
        "name" => &["\"api\"", "\"b\""],
        "ports" => &["[8080]", "[8080, \"9000-9010\"]", "\"*\""],
        "budget" => &["\"2s\"", "\"250ms\"", "\"1m\""],
        "signal" => &["\"SIGKILL\"", "\"TERM\"", "15"],
        "target" => &["\"process\"", "\"thread\""],
        "match" => &[
            "{ comm = [\"gunicorn\"] }",
            "{ exe = [\"/usr/bin/python3*\"], pids = [1] }",
        ],
        "steps" => &[
            "[{ after = \"1s\", signal = \"SIGTERM\" }, { after = \"2s\", signal = \"SIGKILL\" }]",
            "[{ after = \"3s\", action = \"reset\" }]",
        ],
        "client_gone" => &[
            "{ signal = \"SIGKILL\" }",
            "{ signal = \"SIGINT\", grace = \"1s\", half_close_window = \"50ms\" }",
        ],
        "breaker" => &["{ max_actions = 2, window = \"1m\", cooldown = \"5m\" }"],
        "min_workers" => &["2"],
        "routes" => &[
            "[{ path = \"/r/*\", budget = \"5s\" }]",
            "[{ method = \"POST\", path = \"/a\", budget = \"off\" }]",
        ],
        _ => &["\"x\""],
    };
    let bad = [
        "\"soon\"",
        "\"SIGNOPE\"",
        "-3",
        "70000",
        "\"\"",
        "[]",
        "[\"10-5\"]",
        "true",
        "{ what = 1 }",
        "[{ path = \"/a*b\", budget = \"1s\" }]",
        "\"0s\"",
    ];
    prop_oneof![
        8 => proptest::sample::select(good.to_vec()).prop_map(str::to_string),
        1 => proptest::sample::select(bad.to_vec()).prop_map(str::to_string),
        1 => "\\PC{0,8}".prop_map(|s| format!("{s:?}")),
    ]
    .prop_map(move |v| format!("{key} = {v}\n"))
}

/// A file of `[daemon]`, `[protect]` and `[[policy]]` tables with their real keys (each at
/// most once; now and then an unknown one), in any order.
fn toml_shaped() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let daemon: &'static [&'static str] = &[
        "mode",
        "metrics_addr",
        "probes",
        "nice",
        "acting_priority",
        "acting_cpu",
        "on_interrupt",
        "record_query_string",
        "bogus",
    ];
    let protect: &'static [&'static str] = &["comm", "exe", "namespace", "pids", "cgroup", "nope"];
    let policy: &'static [&'static str] = &[
        "ports",
        "signal",
        "target",
        "match",
        "steps",
        "client_gone",
        "breaker",
        "min_workers",
        "routes",
        "extra",
    ];
    let section =
        |head: &'static str, always: &'static [&'static str], keys: &'static [&'static str]| {
            proptest::sample::subsequence(keys.to_vec(), 0..=keys.len().min(4))
                .prop_flat_map(move |picked| {
                    let mut all: Vec<&'static str> = always.to_vec();
                    all.extend(picked);
                    all.into_iter().map(toml_entry).collect::<Vec<_>>()
                })
                .prop_map(move |entries| format!("{head}\n{}", entries.concat()))
        };
    (
        proptest::option::of(section("[daemon]", &[], daemon)),
        proptest::option::of(section("[protect]", &[], protect)),
        proptest::collection::vec(section("[[policy]]", &["name", "budget"], policy), 0..3),
    )
        .prop_map(|(d, p, pols)| {
            let mut out = d.unwrap_or_default();
            out += &p.unwrap_or_default();
            out += &pols.concat();
            out
        })
}

/// The generator is worth running: over a fixed sample, some files are valid, and many
/// more pass TOML syntax and are refused by validation (random strings almost never do).
#[test]
fn toml_shaped_input_reaches_validation() {
    use proptest::strategy::{Strategy, ValueTree};
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut valid, mut validated) = (0, 0);
    for _ in 0..2000 {
        let text = toml_shaped().new_tree(&mut runner).unwrap().current();
        let syntax_ok = toml::from_str::<toml::Table>(&text).is_ok();
        match Config::parse(&text, "generated.toml") {
            Ok(_) => valid += 1,
            Err(_) if syntax_ok => validated += 1,
            Err(_) => {}
        }
    }
    assert!(valid >= 20, "{valid} of 2000 generated files valid");
    assert!(
        validated >= 200,
        "{validated} of 2000 refused past the TOML syntax"
    );
    eprintln!("toml-shaped sample: {valid} valid, {validated} refused by validation");
}

#[test]
fn kill_query_needs_an_account_with_one_server_and_a_private_password_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("wd-cfg-mysql-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pass = dir.join("mysql.pass");
    std::fs::write(&pass, "s3cret\n").unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let policy = |mysql: &str| {
        format!(
            "[[policy]]\nname = \"db\"\nports = [3306]\nbudget = \"30s\"\n\
             steps = [{{ after = \"30s\", action = \"kill_query\" }}, {{ after = \"31s\", action = \"log\" }}]\n{mysql}"
        )
    };
    let account = |server: &str, file: &std::path::Path| {
        format!(
            "mysql = {{ {server}, user = \"watchdog\", password_file = \"{}\" }}\n",
            file.display()
        )
    };
    let c = Config::parse(
        &policy(&account("socket = \"/run/mysqld/mysqld.sock\"", &pass)),
        "f.toml",
    )
    .unwrap();
    let p = &c.policies[0];
    assert_eq!(p.steps[0].action, Action::KillQuery);
    assert_eq!(p.steps[0].action.label(), "kill_query");
    assert!(p.kills_queries());
    assert_eq!(
        p.mysql,
        Some(MysqlAccount {
            server: MysqlServer::Socket("/run/mysqld/mysqld.sock".into()),
            user: "watchdog".into(),
            password_file: pass.clone(),
        })
    );
    let c = Config::parse(
        &policy(&account("address = \"127.0.0.1:3306\"", &pass)),
        "f.toml",
    )
    .unwrap();
    assert_eq!(
        c.policies[0].mysql.as_ref().unwrap().server,
        MysqlServer::Address("127.0.0.1:3306".parse().unwrap())
    );
    // No account: refused, naming the field.
    let e = Config::parse(&policy(""), "f.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("policy[0] (db).mysql") && e.contains("kill_query"),
        "{e}"
    );
    // A client-gone or route ladder with kill_query needs it too.
    let e = Config::parse(
        "[[policy]]\nname = \"db\"\nbudget = \"30s\"\nclient_gone = { steps = [{ after = \"0s\", action = \"kill_query\" }] }\n",
        "f.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("mysql"), "{e}");
    // Exactly one of socket and address; the error has the table's line.
    for server in ["socket = \"/s\", address = \"127.0.0.1:3306\"", "user2 = 1"] {
        let text = policy(&account(server, &pass));
        let e = Config::parse(&text, "f.toml").unwrap_err().to_string();
        assert!(
            e.contains("exactly one of") || e.contains("unknown field"),
            "{e}"
        );
    }
    let e = Config::parse(
        &policy(&account(
            "socket = \"/s\", address = \"127.0.0.1:3306\"",
            &pass,
        )),
        "f.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("f.toml: line 6: policy[0] (db).mysql.socket"),
        "{e}"
    );
    let e = Config::parse(
        &policy(&account("address = \"db.example:3306\"", &pass)),
        "f.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("line 6"), "{e}");
    // The password file: 0600 or stricter, there, readable, not empty.
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = Config::parse(&policy(&account("socket = \"/s\"", &pass)), "f.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("password_file") && e.contains("mode 0640") && e.contains("chmod 600"),
        "{e}"
    );
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o400)).unwrap();
    Config::parse(&policy(&account("socket = \"/s\"", &pass)), "f.toml").unwrap();
    let e = Config::parse(
        &policy(&account("socket = \"/s\"", &dir.join("none"))),
        "f.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("password_file") && e.contains("No such file"),
        "{e}"
    );
    let empty = dir.join("empty.pass");
    std::fs::write(&empty, "\n").unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = Config::parse(&policy(&account("socket = \"/s\"", &empty)), "f.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("is empty"), "{e}");
    let e = Config::parse(&policy(&account("socket = \"/s\"", &dir)), "f.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let e = Config::parse(
        "[[policy]]\nname = \"db\"\nbudget = \"3s\"\nsteps = [{ after = \"3s\", action = \"kill_queries\" }]\n",
        "f.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("\"kill_query\""), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_files_only_root_can_change_are_accepted() {
    // Owner: root or the daemon's own user, nobody else.
    assert_eq!(unsafe_owner_or_mode(0, 0o100644, 0), None);
    assert_eq!(unsafe_owner_or_mode(1000, 0o100600, 1000), None);
    assert_eq!(unsafe_owner_or_mode(0, 0o100444, 1000), None);
    let other = unsafe_owner_or_mode(65534, 0o100644, 0).unwrap();
    assert!(other.contains("owned by uid 65534"), "{other}");
    // Mode: neither group- nor world-writable.
    let group = unsafe_owner_or_mode(0, 0o100664, 0).unwrap();
    assert!(
        group.contains("group-writable") && group.contains("0664"),
        "{group}"
    );
    let world = unsafe_owner_or_mode(0, 0o100646, 0).unwrap();
    assert!(world.contains("world-writable"), "{world}");
}

#[test]
fn a_group_writable_or_foreign_config_file_is_refused_with_its_path() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("wd-cfg-owner-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("watchdog.toml");
    std::fs::write(
        &file,
        "[[policy]]\nname = \"p\"\nports = [8080]\nbudget = \"1s\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    Config::load(&file).expect("a 0644 file of ours is read");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o664)).unwrap();
    let e = Config::load(&file).unwrap_err().to_string();
    assert!(
        e.contains(&file.display().to_string()) && e.contains("group-writable"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreadable_file_names_the_path_and_its_reason_once() {
    let path = std::env::temp_dir().join("watchdog-no-such-config.toml");
    let e = Config::load(&path).unwrap_err();
    let io = std::io::Error::from(std::io::ErrorKind::NotFound).to_string();
    let chain = crate::error_chain(&e);
    assert_eq!(
        e.to_string(),
        path.display().to_string(),
        "the message leaves the source out"
    );
    assert!(
        chain.starts_with(&format!("{}: ", path.display())),
        "{chain}"
    );
    assert_eq!(chain.matches("No such file").count(), 1, "{chain} ({io})");
    // Through anyhow, as the reload log prints it (`{e:#}`): once too.
    let a = format!("{:#}", anyhow::Error::from(e));
    assert_eq!(a.matches("No such file").count(), 1, "{a}");
}
