//! Adaptive receive batching: after a receive that brought fewer messages than it asked for,
//! should the poller wait before the next one so that it comes back with a fuller batch?
//!
//! A wait buys fewer requests per message with latency. The fleet pays it only where the latency
//! is already spent: the poller waits when the measured arrival rate fills the next batches
//! within [`WorkerConfig::batch_wait_max_ms`](crate::config::WorkerConfig::batch_wait_max_ms),
//! and for at most a tenth of how late the receive's freshest message already is (since the
//! fleet first received it). A message less than [`ON_TIME`] late never waits; when the fleet
//! is behind (a backlog upstream, every message seconds
//! old) the downstream stages fill their batches even though each of them sees only a trickle.
//! Measured with `loadtest` (loadtest/README.md).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The wait is at most this fraction of how late the messages already are.
pub const LAG_SHARE: u32 = 10;
/// A message less late than this is on time: it never waits for a batch (a tenth of its lag at
/// each stage would add up along the pipeline).
pub const ON_TIME: Duration = Duration::from_secs(1);
/// Shorter waits are not worth a timer.
const MIN_WAIT: Duration = Duration::from_millis(2);
/// The arrival rate is measured over windows of this length.
const WINDOW: Duration = Duration::from_secs(1);

/// Messages a second one consumer receives, over its pollers: averaged over one-second windows
/// (each new window weighs half).
#[derive(Debug)]
pub struct ArrivalRate {
    state: Mutex<RateState>,
}

#[derive(Debug)]
struct RateState {
    window_start: Instant,
    count: u64,
    per_sec: f64,
}

impl ArrivalRate {
    /// A meter with no measurement yet (rate 0: nothing waits until a window has passed).
    pub fn new(now: Instant) -> Self {
        Self {
            state: Mutex::new(RateState {
                window_start: now,
                count: 0,
                per_sec: 0.0,
            }),
        }
    }

    /// Counts `received` messages at `now`; returns the rate as measured so far.
    pub fn record(&self, received: usize, now: Instant) -> f64 {
        let mut s = self.state.lock().expect("the rate lock is never poisoned");
        s.count += received as u64;
        let elapsed = now.saturating_duration_since(s.window_start);
        if elapsed >= WINDOW {
            let current = s.count as f64 / elapsed.as_secs_f64();
            s.per_sec = if s.per_sec == 0.0 {
                current
            } else {
                (s.per_sec + current) / 2.0
            };
            s.window_start = now;
            s.count = 0;
        }
        s.per_sec
    }
}

/// What one partial receive tells the policy.
#[derive(Debug, Clone, Copy)]
pub struct Partial {
    /// Messages the receive asked for.
    pub asked: usize,
    /// Long-poll loops on the queue (they take turns, so each waits for all of them).
    pub pollers: usize,
    /// Messages a second arriving, as [`ArrivalRate`] measures it.
    pub per_sec: f64,
    /// How late the receive's freshest message already is.
    pub lag: Duration,
    /// How long the receive's freshest message sat in this queue.
    pub queued: Duration,
    /// `batch_wait_max_ms`.
    pub max: Duration,
}

/// How long the poller waits before its next receive: the time the arrival rate takes to fill
/// every poller's next batch, if that is within `max`, and at most a tenth of the lag; zero
/// otherwise, and zero when messages already wait in this queue (its freshest sat there
/// [`ON_TIME`] or longer: the queue has a backlog of its own, and SQS may return a partial
/// batch from one).
pub fn wait_after(p: Partial) -> Duration {
    if p.max.is_zero() || p.per_sec <= 0.0 || p.asked == 0 || p.lag < ON_TIME || p.queued >= ON_TIME
    {
        return Duration::ZERO;
    }
    let fill_secs = (p.asked * p.pollers.max(1)) as f64 / p.per_sec;
    if !fill_secs.is_finite() || fill_secs > p.max.as_secs_f64() {
        return Duration::ZERO;
    }
    let wait = Duration::from_secs_f64(fill_secs).min(p.lag / LAG_SHARE);
    if wait < MIN_WAIT {
        Duration::ZERO
    } else {
        wait
    }
}

/// How long a forward of a message `lag` late may wait for its batch to fill: a tenth of the
/// lag, at most `max` (`forward_flush_ms`); zero when that is too short for a timer.
pub fn linger_for(lag: Duration, max: Duration) -> Duration {
    if lag < ON_TIME {
        return Duration::ZERO;
    }
    let linger = (lag / LAG_SHARE).min(max);
    if linger < MIN_WAIT {
        Duration::ZERO
    } else {
        linger
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(per_sec: f64, lag_ms: u64) -> Partial {
        Partial {
            asked: 10,
            pollers: 2,
            per_sec,
            lag: Duration::from_millis(lag_ms),
            queued: Duration::from_millis(20),
            max: Duration::from_millis(1000),
        }
    }

    #[test]
    fn a_fresh_message_at_a_trickle_never_waits() {
        // 15 a second: two pollers' batches of ten take 1.3 s to fill, longer than the max,
        // however late the message is.
        assert_eq!(wait_after(partial(15.0, 60_000)), Duration::ZERO);
        // Fast arrivals, but the message is on time (900 ms since the fleet got it): no wait.
        assert_eq!(wait_after(partial(500.0, 900)), Duration::ZERO);
    }

    #[test]
    fn a_late_message_waits_for_the_batch_to_fill_and_no_longer() {
        // 40 a second, two pollers: 500 ms fills both next batches.
        assert_eq!(
            wait_after(partial(40.0, 45_000)),
            Duration::from_millis(500)
        );
        // The same rate, 2 s late: a tenth of that.
        assert_eq!(wait_after(partial(40.0, 2_000)), Duration::from_millis(200));
    }

    #[test]
    fn a_queue_with_a_backlog_of_its_own_is_not_waited_on() {
        // Late messages that have sat in this queue for 3 s: it is behind, not a trickle.
        let behind = Partial {
            queued: Duration::from_secs(3),
            ..partial(400.0, 45_000)
        };
        assert_eq!(wait_after(behind), Duration::ZERO);
    }

    #[test]
    fn no_measurement_or_no_max_means_no_wait() {
        assert_eq!(wait_after(partial(0.0, 45_000)), Duration::ZERO);
        let off = Partial {
            max: Duration::ZERO,
            ..partial(400.0, 45_000)
        };
        assert_eq!(wait_after(off), Duration::ZERO);
    }

    #[test]
    fn a_forward_lingers_a_tenth_of_its_lag_up_to_the_max() {
        let max = Duration::from_millis(50);
        assert_eq!(linger_for(Duration::from_millis(900), max), Duration::ZERO);
        assert_eq!(
            linger_for(Duration::from_millis(1_200), Duration::from_millis(500)),
            Duration::from_millis(120)
        );
        assert_eq!(linger_for(Duration::from_secs(45), max), max);
    }

    #[test]
    fn the_rate_is_measured_over_whole_windows_and_smoothed() {
        let t0 = Instant::now();
        let rate = ArrivalRate::new(t0);
        assert_eq!(rate.record(50, t0 + Duration::from_millis(500)), 0.0);
        let first = rate.record(50, t0 + Duration::from_secs(1));
        assert!((first - 100.0).abs() < 1e-9, "{first}");
        // The next window brings 300 a second: half of each.
        let second = rate.record(300, t0 + Duration::from_secs(2));
        assert!((second - 200.0).abs() < 1e-9, "{second}");
    }
}
