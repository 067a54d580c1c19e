//! `watchdog`: parse, validate before binding anything, run, exit with a clear message.

mod actions;
mod api;
mod backstop;
mod blame;
mod breakers;
mod check;
mod cli;
mod clock;
mod config;
mod daemon;
mod decide;
mod diagnose;
mod evict;
mod fds;
mod harm;
mod kernel_btf;
mod loader;
mod logline;
mod metrics;
mod mysql;
mod native;
mod plan;
mod pods;
mod policy;
mod process;
mod request;
mod routes;
mod sched;
mod shutdown;
mod stacks;
mod status;
mod tracker;

use std::process::ExitCode;

use clap::Parser;

use crate::{
    cli::{Cli, Command},
    config::{Config, LogFormat, Overrides, PolicyFlags, Source},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("watchdog: {}", error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

/// "outer: inner: innermost", without backtraces. Each error's message leaves its source out
/// (thiserror `#[source]`, or `transparent`), so each part appears once.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check(a) => {
            init_logging(cli.log_format.unwrap_or_default());
            let ok = check::run(a.config.as_deref(), a.config_only, a.probes);
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Unload(a) => {
            if loader::unload(&a.state_dir)? {
                println!(
                    "removed {}: the programs it held are detached",
                    a.state_dir.display()
                );
            } else {
                println!("nothing pinned at {}", a.state_dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(a) => {
            status::run(&a.status_socket, a.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(a) => {
            let flags = a.has_policy_flags().then(|| PolicyFlags {
                ports: a.ports.clone(),
                budget: a.budget,
                signal: a.signal,
                target: a.target,
                pids: a.pids.clone(),
                observe: a.observe,
                client_gone: a.client_gone,
            });
            let overrides = Overrides {
                metrics_addr: a.metrics_addr,
                status_socket: a.status_socket.clone(),
                events: a.events.clone(),
                observe: a.observe,
                probes: a.probes,
                state_dir: a.state_dir.clone(),
                max_connections: a.max_connections,
                event_buffer_kib: a.event_buffer_kib,
                on_interrupt: a.on_interrupt,
                stacks: a.stacks,
            };
            let cfg = Config::resolve(Source::of(a.config.as_deref(), flags)?, &overrides)?;
            init_logging(cli.log_format.unwrap_or(cfg.log_format));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(cfg, a.config.clone(), a.observe))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init_logging(format: LogFormat) {
    // The stack reader's library logs every read at info: keep it to warnings.
    let quiet = ["py_spy=warn", "remoteprocess=warn", "goblin=warn"];
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("WATCHDOG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    for d in quiet {
        if let Ok(d) = d.parse() {
            filter = filter.add_directive(d);
        }
    }
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Escaped values: a process's name or arguments never make a line of their own.
        LogFormat::Text => b.fmt_fields(logline::fields()).init(),
        LogFormat::Json => b.json().flatten_event(true).with_current_span(false).init(),
    }
}
