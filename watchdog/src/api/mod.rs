//! The daemon's two doors: an HTTP listener for Prometheus and Kubernetes probes (`http.rs`:
//! `/metrics`, `/healthz`, `/readyz`, on hyper, on a thread of its own), and a root-only unix
//! socket that `watchdog status` reads.

pub mod http;

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64},
        Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncWriteExt,
    net::UnixListener,
    sync::{mpsc, oneshot},
};

/// Liveness and readiness, shared with the event loop.
#[derive(Debug, Default)]
pub struct Health {
    /// Monotonic seconds of the event loop's last turn.
    pub last_tick: AtomicU64,
    /// Programs attached and policies applied.
    pub ready: AtomicBool,
    /// The kernel's own word on whether the pinned links are still attached (`watch_links`).
    links: OnceLock<crate::loader::LinkCheck>,
    /// The last answer of `links` and when it was asked: asked at most every `LINKS_EVERY`.
    links_seen: Mutex<Option<(Instant, Result<(), String>)>>,
}

/// How long a reading of the links serves: a flood of probes or scrapes costs one check per
/// period (a handful of `bpf` calls), and a detach shows within this much.
pub const LINKS_EVERY: Duration = Duration::from_secs(1);

impl Health {
    /// From now on, `attached` asks the kernel about these links.
    pub fn watch_links(&self, check: crate::loader::LinkCheck) {
        let _ = self.links.set(check);
    }

    /// Whether the programs are still attached, as the kernel says (cached `LINKS_EVERY`).
    /// `Ok` when no links are watched.
    pub fn attached(&self) -> Result<(), String> {
        let Some(check) = self.links.get() else {
            return Ok(());
        };
        let Ok(mut seen) = self.links_seen.lock() else {
            return check.attached();
        };
        match &*seen {
            Some((at, answer)) if at.elapsed() < LINKS_EVERY => answer.clone(),
            _ => {
                let answer = check.attached();
                *seen = Some((Instant::now(), answer.clone()));
                answer
            }
        }
    }
}

/// A status request from the socket to the event loop, answered with the JSON document.
pub type StatusRequest = oneshot::Sender<String>;

/// Binds the status socket, owner-only (0600) in a 0700 directory it creates if needed.
pub fn bind_status(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// How long the status socket waits after a failed accept before it tries again.
const STATUS_ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

/// Answers each connection on the status socket with one JSON document from the event loop.
/// A failed accept (EMFILE/ENFILE: the connection stays in the backlog, so retrying at once
/// would spin the event loop) is counted in `errors` and waits `STATUS_ACCEPT_BACKOFF`.
pub async fn serve_status(
    listener: UnixListener,
    tx: mpsc::Sender<StatusRequest>,
    errors: prometheus_client::metrics::counter::Counter,
) {
    loop {
        let mut stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                if errors.inc() == 0 {
                    tracing::warn!(error = %e, "status socket: accept failed; backing off (counted in watchdog_status_accept_errors_total)");
                }
                tokio::time::sleep(STATUS_ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Only root may ask (the socket mode already says so; this also covers a chmod).
        match stream.peer_cred() {
            Ok(c) if c.uid() == 0 => {}
            _ => {
                let _ = stream
                    .write_all(b"{\"error\":\"only root may read the status\"}\n")
                    .await;
                continue;
            }
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        if tx.send(reply_tx).await.is_err() {
            return;
        }
        if let Ok(doc) = reply_rx.await {
            let _ = stream.write_all(doc.as_bytes()).await;
        }
    }
}
