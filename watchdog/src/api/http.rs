//! `/metrics`, `/healthz` and `/readyz` on hyper, built so that nothing a client does can slow
//! enforcement: the server runs on a thread and runtime of its own (never on the event loop's),
//! every connection has a deadline for its request head, at most `MAX_CONNECTIONS` are open at
//! once (a new one closes the oldest, which a slow or idle client holds), one request per
//! connection, GET and HEAD only, and accept errors (descriptors exhausted) back off.

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, task::AbortHandle};
use tracing::warn;

use super::Health;

/// Connections open at once; beyond it, the oldest is closed to make room.
pub const MAX_CONNECTIONS: usize = 64;
/// A client has this long to send its request head (slowloris), and to be answered.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How stale the event loop may be before `/healthz` fails.
const LIVENESS_LIMIT_SECS: u64 = 10;
/// Accept errors wait this long at first, doubling up to `ACCEPT_BACKOFF_MAX`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Starts the server on its own thread; it runs for the life of the process.
pub fn spawn(
    listener: std::net::TcpListener,
    registry: Arc<Registry>,
    health: Arc<Health>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("watchdog-http".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!("metrics server: no runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => serve(l, registry, health).await,
                    Err(e) => warn!("metrics server: {e}"),
                }
            });
        })?;
    Ok(())
}

async fn serve(listener: TcpListener, registry: Arc<Registry>, health: Arc<Health>) {
    let mut open: VecDeque<AbortHandle> = VecDeque::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                s
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: the connection stays in the backlog; retrying at once
                // would spin. Closing the oldest connection gives a descriptor back.
                warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "metrics server: accept failed; backing off");
                if let Some(old) = open.pop_front() {
                    old.abort();
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        open.retain(|h| !h.is_finished());
        while open.len() >= MAX_CONNECTIONS {
            if let Some(old) = open.pop_front() {
                old.abort();
            }
        }
        let (registry, health) = (registry.clone(), health.clone());
        let task = tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (registry, health) = (registry.clone(), health.clone());
                async move { Ok::<_, Infallible>(answer(&req, &registry, &health)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            // The whole exchange is bounded too, not only the head.
            let _ = tokio::time::timeout(HEAD_TIMEOUT * 2, conn).await;
        });
        open.push_back(task.abort_handle());
    }
}

/// The response to one request.
pub fn answer(
    req: &Request<Incoming>,
    registry: &Registry,
    health: &Health,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        let body = if req.method() == Method::HEAD {
            Bytes::new()
        } else {
            Bytes::from(body)
        };
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        if let Ok(v) = ctype.parse() {
            r.headers_mut().insert(CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET or HEAD\n".into(),
        );
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            crate::metrics::render(registry),
        ),
        "/healthz" => {
            // The event loop's health, not the listener's: this thread answers even when the
            // loop is stuck, and says so.
            let age =
                crate::clock::mono_secs().saturating_sub(health.last_tick.load(Ordering::Relaxed));
            if age > LIVENESS_LIMIT_SECS {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("event loop stalled for {age}s\n"),
                )
            } else if let Err(why) = health.attached() {
                // Detached programs enforce nothing: a restart loads them again.
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("programs not attached: {why}\n"),
                )
            } else {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            }
        }
        "/readyz" => {
            if !health.ready.load(Ordering::Relaxed) {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready\n".into(),
                )
            } else if let Err(why) = health.attached() {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: programs not attached: {why}\n"),
                )
            } else {
                reply(StatusCode::OK, "text/plain", "ready\n".into())
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
