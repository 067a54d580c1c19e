//! The daemon's two doors: an HTTP listener for Prometheus and Kubernetes probes (`/metrics`,
//! `/healthz`, `/readyz`), and a root-only unix socket that `watchdog status` reads.
//!
//! The HTTP side is deliberately tiny (three GET routes, one request per connection, bounded
//! reads): it needs no HTTP framework.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, UnixListener},
    sync::{mpsc, oneshot},
};

/// Liveness and readiness, shared with the event loop.
#[derive(Debug, Default)]
pub struct Health {
    /// Monotonic seconds of the event loop's last turn.
    pub last_tick: AtomicU64,
    /// Programs attached and policies applied.
    pub ready: AtomicBool,
}

/// How stale the event loop may be before `/healthz` fails.
const LIVENESS_LIMIT_SECS: u64 = 10;

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve_http(listener: TcpListener, registry: Arc<Registry>, health: Arc<Health>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        let health = health.clone();
        tokio::spawn(async move {
            // Read the whole request head (bounded) so closing never leaves unread bytes (a RST).
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
            }
            let req = String::from_utf8_lossy(&buf);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = match path {
                "/metrics" => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    crate::metrics::render(&registry),
                ),
                "/healthz" => {
                    let age = crate::clock::mono_secs()
                        .saturating_sub(health.last_tick.load(Ordering::Relaxed));
                    if age <= LIVENESS_LIMIT_SECS {
                        ("200 OK", "text/plain", "ok\n".to_string())
                    } else {
                        (
                            "503 Service Unavailable",
                            "text/plain",
                            format!("event loop stalled for {age}s\n"),
                        )
                    }
                }
                "/readyz" => {
                    if health.ready.load(Ordering::Relaxed) {
                        ("200 OK", "text/plain", "ready\n".to_string())
                    } else {
                        (
                            "503 Service Unavailable",
                            "text/plain",
                            "not ready\n".to_string(),
                        )
                    }
                }
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "try /metrics, /healthz or /readyz\n".to_string(),
                ),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
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

/// Answers each connection on the status socket with one JSON document from the event loop.
pub async fn serve_status(listener: UnixListener, tx: mpsc::Sender<StatusRequest>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
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
