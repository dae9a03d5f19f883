//! Adaptive receive batching: after a receive that brought fewer messages than it asked for,
//! should the consumer hold its next one so that it comes back with a fuller batch?
//!
//! A wait buys fewer requests per message with latency. The fleet pays it only where the latency
//! is already spent: the consumer holds its receives ([`ReceiveHold`]) when the measured arrival
//! rate fills the next batch within
//! [`WorkerConfig::batch_wait_max_ms`](crate::config::WorkerConfig::batch_wait_max_ms), and for
//! at most a tenth of how late the receive's freshest message already is (since the fleet first
//! received it). A message less than [`ON_TIME`] late never waits; when the fleet is behind (a
//! backlog upstream, every message seconds old) the downstream stages fill their batches even
//! though each of them sees only a trickle.
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
    /// Messages a second arriving, as [`ArrivalRate`] measures it.
    pub per_sec: f64,
    /// How late the receive's freshest message already is.
    pub lag: Duration,
    /// How long the receive's freshest message sat in this queue.
    pub queued: Duration,
    /// `batch_wait_max_ms`.
    pub max: Duration,
}

/// How long the consumer holds its next receive (see [`ReceiveHold`]): the time the arrival
/// rate takes to fill the next batch, if that is within `max`, and at most a tenth of the lag; zero
/// otherwise, and zero when messages already wait in this queue (its freshest sat there
/// [`ON_TIME`] or longer: the queue has a backlog of its own, and SQS may return a partial
/// batch from one).
pub fn wait_after(p: Partial) -> Duration {
    if p.max.is_zero() || p.per_sec <= 0.0 || p.asked == 0 || p.lag < ON_TIME || p.queued >= ON_TIME
    {
        return Duration::ZERO;
    }
    let fill_secs = p.asked as f64 / p.per_sec;
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

/// Adaptive batching's hold on one consumer's receives. After a partial receive that decides
/// to wait, no poller of the consumer receives until the hold ends, and they take turns: one
/// waits out the hold and receives while the others wait for their turn. A poller left in a
/// long poll meanwhile would catch the early arrivals one by one, a request each (measured with
/// `loadtest --backlog`). Receives run free, all pollers at once, when no hold is set.
#[derive(Debug)]
pub struct ReceiveHold {
    until: Mutex<Option<tokio::time::Instant>>,
    turn: tokio::sync::Mutex<()>,
}

impl Default for ReceiveHold {
    fn default() -> Self {
        Self {
            until: Mutex::new(None),
            turn: tokio::sync::Mutex::new(()),
        }
    }
}

impl ReceiveHold {
    fn until(&self) -> Option<tokio::time::Instant> {
        *self.until.lock().expect("the hold lock is never poisoned")
    }

    /// Whether a hold is set (receives take turns).
    pub fn is_set(&self) -> bool {
        self.until().is_some()
    }

    /// Waits for this poller's turn and then for the hold to end; `None` at once when no hold
    /// is set. The poller receives while it keeps the guard, and sets the next hold
    /// ([`ReceiveHold::set`]) before it lets go.
    pub async fn turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        if !self.is_set() {
            return None;
        }
        let guard = self.turn.lock().await;
        if let Some(until) = self.until() {
            tokio::time::sleep_until(until).await;
        }
        Some(guard)
    }

    /// After a receive: hold the next one for `wait` from `now`, or lift the hold when `wait`
    /// is zero.
    pub fn set(&self, wait: Duration, now: tokio::time::Instant) {
        *self.until.lock().expect("the hold lock is never poisoned") =
            (!wait.is_zero()).then(|| now + wait);
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
            per_sec,
            lag: Duration::from_millis(lag_ms),
            queued: Duration::from_millis(20),
            max: Duration::from_millis(1000),
        }
    }

    #[test]
    fn a_fresh_message_at_a_trickle_never_waits() {
        // 8 a second: a batch of ten takes 1.25 s to fill, longer than the max, however late
        // the message is.
        assert_eq!(wait_after(partial(8.0, 60_000)), Duration::ZERO);
        // Fast arrivals, but the message is on time (900 ms since the fleet got it): no wait.
        assert_eq!(wait_after(partial(500.0, 900)), Duration::ZERO);
    }

    #[test]
    fn a_late_message_waits_for_the_batch_to_fill_and_no_longer() {
        // 20 a second: 500 ms fills the next batch.
        assert_eq!(
            wait_after(partial(20.0, 45_000)),
            Duration::from_millis(500)
        );
        // The same rate, 2 s late: a tenth of that.
        assert_eq!(wait_after(partial(20.0, 2_000)), Duration::from_millis(200));
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

    #[tokio::test(start_paused = true)]
    async fn a_hold_makes_pollers_take_turns_and_lifts_when_a_receive_needs_no_wait() {
        let hold = std::sync::Arc::new(ReceiveHold::default());
        assert!(hold.turn().await.is_none(), "no hold: receives run free");
        let start = tokio::time::Instant::now();
        hold.set(Duration::from_millis(300), start);
        let first = hold.turn().await.expect("a hold is set");
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        // While the first poller receives, a second waits for its turn, not in a long poll.
        let second = tokio::spawn({
            let hold = std::sync::Arc::clone(&hold);
            async move {
                let _turn = hold.turn().await;
                tokio::time::Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished());
        // The first receive was partial again: the next one is held 200 ms from now.
        hold.set(Duration::from_millis(200), tokio::time::Instant::now());
        drop(first);
        let second_at = second.await.unwrap();
        assert_eq!(second_at - start, Duration::from_millis(550));
        // A full receive lifts the hold.
        hold.set(Duration::ZERO, tokio::time::Instant::now());
        assert!(hold.turn().await.is_none());
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
