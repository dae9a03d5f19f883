//! Liveness and readiness, served on `/healthz` and `/readyz` next to `/metrics`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

/// How long past its deadline a job may still run before `/healthz` fails (by default): the
/// deadline stops a handler that yields, so a job this late is stuck in code that never yields
/// (on a multi-threaded runtime; on the default one thread such code stalls the process and
/// `/healthz` does not answer, which the container health check treats as failed too).
pub const JOB_GRACE: Duration = Duration::from_secs(30);

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
    /// A poller that completed no receive for this long (and is not waiting for room) is
    /// wedged; 0 = the default (120 s).
    poller_stale_ms: AtomicU64,
    /// [`JOB_GRACE`] unless set (ms + 1, so that 0 means unset).
    job_grace_ms: AtomicU64,
    next_id: AtomicU64,
    pollers: Mutex<HashMap<u64, PollerState>>,
    jobs: Mutex<HashMap<u64, JobState>>,
}

#[derive(Debug)]
struct PollerState {
    name: String,
    last_progress: Instant,
    /// Since when it waits for room, if it does.
    waiting_since: Option<Instant>,
}

#[derive(Debug)]
struct JobState {
    queue: Arc<str>,
    started: Instant,
    deadline: Duration,
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

    /// Sets how long a poller may go without completing a receive
    /// (`observability.poller_stale_secs`).
    pub fn set_poller_stale(&self, after: Duration) {
        self.inner
            .poller_stale_ms
            .store(after.as_millis() as u64, Ordering::Relaxed);
    }

    /// Sets how long past its deadline a job may run before `/healthz` fails.
    pub fn set_job_grace(&self, grace: Duration) {
        self.inner
            .job_grace_ms
            .store(grace.as_millis() as u64 + 1, Ordering::Relaxed);
    }

    fn job_grace(&self) -> Duration {
        match self.inner.job_grace_ms.load(Ordering::Relaxed) {
            0 => JOB_GRACE,
            ms => Duration::from_millis(ms - 1),
        }
    }

    fn poller_stale(&self) -> Duration {
        match self.inner.poller_stale_ms.load(Ordering::Relaxed) {
            0 => Duration::from_secs(120),
            ms => Duration::from_millis(ms),
        }
    }

    /// Registers a poller (until the probe is dropped).
    pub fn poller(&self, name: impl Into<String>) -> PollerProbe {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner.pollers.lock().expect("health lock").insert(
            id,
            PollerState {
                name: name.into(),
                last_progress: Instant::now(),
                waiting_since: None,
            },
        );
        PollerProbe {
            health: self.clone(),
            id,
        }
    }

    /// Registers a running job with its deadline (until the probe is dropped).
    pub fn job(&self, queue: impl Into<Arc<str>>, deadline: Duration) -> JobProbe {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner.jobs.lock().expect("health lock").insert(
            id,
            JobState {
                queue: queue.into(),
                started: Instant::now(),
                deadline,
            },
        );
        JobProbe {
            health: self.clone(),
            id,
        }
    }

    /// Live or not: `Err` names the first wedged poller (no receive completed for
    /// `poller_stale_secs` while not waiting for room) or job (running past its deadline plus
    /// the grace, [`JOB_GRACE`] by default).
    ///
    /// # Errors
    /// What is wedged.
    pub fn check(&self) -> Result<(), String> {
        let stale = self.poller_stale();
        for p in self.inner.pollers.lock().expect("health lock").values() {
            let idle = p.last_progress.elapsed();
            if p.waiting_since.is_none() && idle > stale {
                return Err(format!(
                    "poller of {} completed no receive for {} s",
                    p.name,
                    idle.as_secs()
                ));
            }
        }
        let grace = self.job_grace();
        for j in self.inner.jobs.lock().expect("health lock").values() {
            let ran = j.started.elapsed();
            if ran > j.deadline + grace {
                return Err(format!(
                    "a job on {} has run {} s, past its {} s deadline",
                    j.queue,
                    ran.as_secs(),
                    j.deadline.as_secs()
                ));
            }
        }
        Ok(())
    }
}

/// A poller's entry in [`Health`]; removed on drop.
#[derive(Debug)]
pub struct PollerProbe {
    health: Health,
    id: u64,
}

impl PollerProbe {
    fn update(&self, f: impl FnOnce(&mut PollerState)) {
        if let Some(p) = self
            .health
            .inner
            .pollers
            .lock()
            .expect("health lock")
            .get_mut(&self.id)
        {
            f(p);
        }
    }

    /// A receive completed.
    pub fn received(&self) {
        self.health.beat();
        self.update(|p| {
            p.last_progress = Instant::now();
            p.waiting_since = None;
        });
    }

    /// The poller waits for room under the in-flight cap (not wedged: the jobs holding the room
    /// are watched by their deadlines), or stops waiting.
    pub fn waiting_for_room(&self, waiting: bool) {
        self.update(|p| match (p.waiting_since, waiting) {
            (None, true) => p.waiting_since = Some(Instant::now()),
            (Some(since), false) => {
                // Time spent waiting for room is not time without progress.
                p.last_progress += since.elapsed();
                p.waiting_since = None;
            }
            _ => {}
        });
    }
}

impl Drop for PollerProbe {
    fn drop(&mut self) {
        self.health
            .inner
            .pollers
            .lock()
            .expect("health lock")
            .remove(&self.id);
    }
}

/// A job's entry in [`Health`]; removed on drop.
#[derive(Debug)]
pub struct JobProbe {
    health: Health,
    id: u64,
}

impl Drop for JobProbe {
    fn drop(&mut self) {
        self.health
            .inner
            .jobs
            .lock()
            .expect("health lock")
            .remove(&self.id);
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
    let live = health.clone();
    let mut app = Router::new()
        .route(
            "/healthz",
            get(move || {
                let verdict = live.check();
                async move {
                    match verdict {
                        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
                        Err(why) => {
                            tracing::error!(why, "unhealthy");
                            (
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("unhealthy: {why}\n"),
                            )
                        }
                    }
                }
            }),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poller_without_receives_and_a_job_past_its_deadline_are_unhealthy() {
        let health = Health::default();
        health.set_poller_stale(Duration::from_millis(50));
        let poller = health.poller("orders");
        assert!(health.check().is_ok());
        std::thread::sleep(Duration::from_millis(80));
        let why = health.check().unwrap_err();
        assert!(why.contains("poller of orders"), "{why}");
        poller.received();
        assert!(health.check().is_ok(), "a receive is progress");
        poller.waiting_for_room(true);
        std::thread::sleep(Duration::from_millis(80));
        assert!(health.check().is_ok(), "waiting for room is not wedged");
        poller.waiting_for_room(false);
        drop(poller);

        health.set_job_grace(Duration::from_millis(20));
        let job = health.job("orders", Duration::from_millis(20));
        assert!(health.check().is_ok(), "within its deadline");
        std::thread::sleep(Duration::from_millis(60));
        let why = health.check().unwrap_err();
        assert!(why.contains("past its"), "{why}");
        drop(job);
        assert!(health.check().is_ok(), "a finished job is forgotten");
    }
}
