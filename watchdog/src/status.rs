//! `watchdog status`: reads the daemon's status socket and prints it.

use std::{
    fmt::Write as _,
    io::{Read, Write as _},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::Context as _;

pub fn run(socket: &Path, json: bool) -> anyhow::Result<()> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the daemon at {} (is it running? are you root?)",
            socket.display()
        )
    })?;
    let mut doc = String::new();
    s.read_to_string(&mut doc).context("reading the status")?;
    if json {
        return emit(&doc);
    }
    let v: serde_json::Value =
        serde_json::from_str(&doc).context("the daemon sent something that is not JSON")?;
    if let Some(e) = v.get("error") {
        anyhow::bail!("daemon: {e}");
    }
    let s = |v: &serde_json::Value, k: &str| {
        v.get(k)
            .map(|x| x.to_string().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    // namespace/pod/container of a Kubernetes owner; empty on the host.
    let pod = |v: &serde_json::Value| {
        ["namespace", "pod", "container"]
            .iter()
            .filter_map(|k| v.get(*k).and_then(|x| x.as_str()))
            .collect::<Vec<_>>()
            .join("/")
    };
    let mut out = String::new();
    writeln!(out, "POLICIES")?;
    for p in v["policies"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  {:<16} ports {:<14} budget {:>7}ms  mode {:<8} steps {}",
            s(p, "name"),
            s(p, "ports"),
            s(p, "budget_ms"),
            s(p, "mode"),
            p["steps"]
                .as_array()
                .map(|a| a
                    .iter()
                    .map(|x| x.as_str().unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join(" → "))
                .unwrap_or_default()
        )?;
    }
    let c = &v["connections"];
    writeln!(
        out,
        "CONNECTIONS  tracked {}  adopted, idle {}  upgraded (no longer tracked for requests) {}  by protocol {}",
        s(c, "tracked"),
        s(c, "adopted_idle"),
        s(c, "upgraded"),
        c["by_protocol"]
            .as_object()
            .map(|m| m
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    )?;
    writeln!(out, "IN FLIGHT")?;
    writeln!(
        out,
        "  {:>6} {:>8} {:>8} {:<16} {:<22} {:>9} {:>9}  {:<12} {:<16} {:<16} REQUEST",
        "PORT", "PID", "TID", "COMM", "PEER", "AGE_MS", "BUDGET_MS", "POLICY", "ROUTE", "POD"
    )?;
    for r in v["in_flight"].as_array().into_iter().flatten() {
        let budget = match r["budget_ms"].as_u64() {
            Some(b) => b.to_string(),
            None => "off".into(),
        };
        writeln!(
            out,
            "  {:>6} {:>8} {:>8} {:<16} {:<22} {:>9} {:>9}  {:<12} {:<16} {:<16} {}",
            s(r, "port"),
            s(r, "pid"),
            s(r, "tid"),
            s(r, "comm"),
            s(r, "peer"),
            s(r, "age_ms"),
            budget,
            s(r, "policy"),
            s(r, "route"),
            pod(r),
            r["request"].as_str().unwrap_or("-")
        )?;
    }
    writeln!(out, "RECENT ACTIONS")?;
    for a in v["recent_actions"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  {:<12} {:<10} pid {:<8} tid {:<8} {:<10} {:<11} after {}ms (lateness {:.2}ms)  {} [{}] {}",
            s(a, "policy"),
            s(a, "action"),
            s(a, "pid"),
            s(a, "tid"),
            s(a, "result"),
            s(a, "reason"),
            s(a, "elapsed_ms"),
            a["lateness_ms"].as_f64().unwrap_or(0.0),
            a["request"].as_str().unwrap_or("-"),
            s(a, "route"),
            pod(a)
        )?;
        for line in stack_lines(a) {
            writeln!(out, "      {line}")?;
        }
    }
    emit(&out)
}

/// Writes `text` to standard output. A reader that went away (`watchdog status | head`) is not
/// an error: the rest is not wanted, and the command ends quietly.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing the status"),
    }
}

/// The innermost frames of an action's Python stack and native stack, one line each.
fn stack_lines(a: &serde_json::Value) -> Vec<String> {
    let frames = |r: &serde_json::Value, f: &dyn Fn(&serde_json::Value) -> String| {
        if let Some(e) = r["error"].as_str() {
            return format!("({e})");
        }
        let all: Vec<_> = r["frames"].as_array().into_iter().flatten().collect();
        let mut out: Vec<String> = all.iter().take(STATUS_FRAMES).map(|x| f(x)).collect();
        if all.len() > STATUS_FRAMES {
            out.push(format!("... {} more", all.len() - STATUS_FRAMES));
        }
        out.join(" < ")
    };
    let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let mut lines = Vec::new();
    if a["stack"].is_object() {
        lines.push(format!(
            "python: {}",
            frames(&a["stack"], &|f| format!(
                "{} ({}:{})",
                f["function"].as_str().unwrap_or("?"),
                base(f["file"].as_str().unwrap_or("?")),
                f["line"]
            ))
        ));
    }
    if a["native_stack"].is_object() {
        lines.push(format!(
            "native: {}",
            frames(&a["native_stack"], &|f| {
                let m = base(f["module"].as_str().unwrap_or("?"));
                match f["function"].as_str() {
                    Some(func) => format!("{func} ({m})"),
                    None => format!("{} ({m})", f["address"].as_str().unwrap_or("?")),
                }
            })
        ));
    }
    lines
}

/// Frames shown per stack in `watchdog status` (the event record has them all).
const STATUS_FRAMES: usize = 6;
