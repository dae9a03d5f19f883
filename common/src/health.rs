//! Liveness and readiness, served on `/healthz` and `/readyz` next to `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

/// Shared health state of one process.
#[derive(Clone, Debug, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Debug, Default)]
struct HealthInner {
    /// Consuming: queues resolved, pollers running, not shutting down.
    ready: AtomicBool,
    /// Last successful receive, in epoch milliseconds (0 = none yet).
    last_receive_ms: AtomicU64,
}

impl Health {
    /// Marks the process ready (or not) to take work.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether the process is ready.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst)
    }

    /// Records a successful receive.
    pub fn beat(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        self.inner.last_receive_ms.store(now, Ordering::Relaxed);
    }

    /// Epoch milliseconds of the last successful receive, 0 when none yet.
    pub fn last_receive_ms(&self) -> u64 {
        self.inner.last_receive_ms.load(Ordering::Relaxed)
    }
}

/// Serves `/healthz`, `/readyz` and (when `metrics` is given) `/metrics` on `addr` until
/// `shutdown`; returns the bound address (useful with port 0).
///
/// # Errors
/// When the address cannot be bound (say which, so the operator can pick another).
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} for /metrics and health ({e}); set observability.listen_addr"))
    })?;
    let bound = listener.local_addr()?;
    let ready = health.clone();
    let mut app = Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        );
    if let Some(handle) = metrics {
        app = app.route("/metrics", get(move || std::future::ready(handle.render())));
    }
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(bound)
}
