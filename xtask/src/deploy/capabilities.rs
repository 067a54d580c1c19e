//! The DaemonSet's capabilities for other users' processes (KILL, SYS_PTRACE,
//! DAC_READ_SEARCH) and for the acting thread's realtime class (SYS_NICE), shown with `setpriv`
//! to suffice and to be needed.

use super::*;

/// The capabilities the DaemonSet adds, upper case without `CAP_`.
pub(super) fn capabilities(ds: &Value) -> Result<Vec<String>> {
    let add =
        &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"];
    let caps: Vec<String> = add
        .as_array()
        .context("no capabilities added")?
        .iter()
        .filter_map(Value::as_str)
        .map(|c| c.trim_start_matches("CAP_").to_ascii_uppercase())
        .collect();
    ensure!(
        !caps.contains(&"SYS_ADMIN".to_string()),
        "the DaemonSet adds SYS_ADMIN"
    );
    Ok(caps)
}

pub(super) fn setpriv_caps(caps: &[String]) -> String {
    let mut s = "-all".to_string();
    for c in caps {
        s.push_str(",+");
        s.push_str(&c.to_ascii_lowercase());
    }
    s
}

/// What the daemon does to another user's process, under exactly `caps` (root, every other
/// capability out of the bounding set), and under `caps` less the one each step needs: the
/// first must work, the second must not. Returns the capabilities not covered here.
pub(super) fn proc_capabilities(caps: &[String]) -> Result<Vec<String>> {
    let mut target = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sleep",
            "60",
        ])
        .stdin(Stdio::null())
        .spawn()
        .context("starting a process as nobody")?;
    let pid = target.id();
    let result = (|| -> Result<Vec<String>> {
        // Wait for the exec, so /proc shows nobody's process.
        for _ in 0..100 {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if status.contains("Uid:\t65534") && status.contains("Name:\tsleep") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let probes: [(&str, Vec<String>); 4] = [
            ("KILL", vec!["kill".into(), "-0".into(), pid.to_string()]),
            (
                "SYS_PTRACE",
                vec!["readlink".into(), format!("/proc/{pid}/exe")],
            ),
            (
                "DAC_READ_SEARCH",
                vec!["ls".into(), format!("/proc/{pid}/fd")],
            ),
            // What the acting thread does at start (root's RLIMIT_RTPRIO is 0).
            (
                "SYS_NICE",
                vec!["chrt".into(), "-f".into(), "10".into(), "true".into()],
            ),
        ];
        let try_with = |set: &[String], argv: &[String]| -> Result<bool> {
            Ok(output(
                Command::new("setpriv")
                    .arg(format!("--bounding-set={}", setpriv_caps(set)))
                    .args(["--inh-caps=-all", "--"])
                    .args(argv),
            )?
            .status
            .success())
        };
        for (cap, argv) in &probes {
            ensure!(
                caps.iter().any(|c| c == cap),
                "the DaemonSet lacks CAP_{cap}, needed for `{}` on another user's process",
                argv.join(" ")
            );
            ensure!(
                try_with(caps, argv)?,
                "`{}` fails with the DaemonSet's capabilities {caps:?}",
                argv.join(" ")
            );
            let without: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
            ensure!(
                !try_with(&without, argv)?,
                "`{}` works without CAP_{cap}: is that capability still needed?",
                argv.join(" ")
            );
        }
        Ok(caps
            .iter()
            .filter(|c| !probes.iter().any(|(p, _)| p == c))
            .cloned()
            .collect())
    })();
    let _ = target.kill();
    let _ = target.wait();
    result
}
