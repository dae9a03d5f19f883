//! The adaptive concurrency limit (AIMD): how many messages a consumer may hold at once, between
//! 1 and its `max_in_flight`. Throttling halves it (at most once per [`DECREASE_EVERY`], so one
//! burst of throttled calls counts once); each run of `limit` successes adds one back. The
//! pollers ask for no more than the limit leaves free, so a throttled consumer receives less and
//! holds less, and grows back when DynamoDB keeps up again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The shortest time between two decreases.
pub const DECREASE_EVERY: Duration = Duration::from_secs(1);

/// An AIMD limit shared by a consumer's pollers and jobs.
#[derive(Debug)]
pub struct Concurrency {
    max: usize,
    limit: AtomicUsize,
    successes: AtomicUsize,
    last_decrease: Mutex<Option<Instant>>,
    raised: Notify,
}

impl Concurrency {
    /// A limit that starts at (and never exceeds) `max`.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            max,
            limit: AtomicUsize::new(max),
            successes: AtomicUsize::new(0),
            last_decrease: Mutex::new(None),
            raised: Notify::new(),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// A downstream throttled: halve the limit, unless it was halved within
    /// [`DECREASE_EVERY`]. Returns the limit after.
    pub fn throttled(&self) -> usize {
        let mut last = self.last_decrease.lock().expect("concurrency lock");
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < DECREASE_EVERY) {
            return self.limit();
        }
        *last = Some(now);
        self.successes.store(0, Ordering::Relaxed);
        let halved = (self.limit() / 2).max(1);
        self.limit.store(halved, Ordering::Relaxed);
        halved
    }

    /// A message was handled without throttling: one more after `limit` of them. Returns the
    /// limit after.
    pub fn succeeded(&self) -> usize {
        if self.limit() >= self.max {
            return self.limit();
        }
        if self.successes.fetch_add(1, Ordering::Relaxed) + 1 < self.limit() {
            return self.limit();
        }
        self.successes.store(0, Ordering::Relaxed);
        // Compare-and-swap: a halving by a throttled job in between is not overwritten.
        let raised = self
            .limit
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |limit| {
                (limit < self.max).then_some(limit + 1)
            })
            .map_or_else(|current| current, |before| before + 1);
        self.raised.notify_waiters();
        raised
    }

    /// How many more messages may be taken when `in_use` are held: 0 when at the limit.
    pub fn room(&self, in_use: usize) -> usize {
        self.limit().saturating_sub(in_use)
    }

    /// Waits until the limit is raised, or `at_most` has passed (jobs finishing also make
    /// room, so the caller looks again either way).
    pub async fn wait_for_room(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.raised.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn throttling_halves_once_per_burst_and_successes_grow_it_back() {
        let c = Concurrency::new(32);
        assert_eq!(c.throttled(), 16);
        assert_eq!(c.throttled(), 16, "the same burst counts once");
        tokio::time::advance(DECREASE_EVERY).await;
        assert_eq!(c.throttled(), 8);
        tokio::time::advance(DECREASE_EVERY).await;
        assert_eq!(c.throttled(), 4);
        for _ in 0..10 {
            tokio::time::advance(DECREASE_EVERY).await;
            c.throttled();
        }
        assert_eq!(c.limit(), 1, "never below one");
        assert_eq!(c.room(0), 1);
        assert_eq!(c.room(1), 0);
        // Additive increase: one per `limit` successes.
        let mut successes = 0;
        while c.limit() < 32 {
            c.succeeded();
            successes += 1;
        }
        assert_eq!(successes, (1..32).sum::<usize>(), "1 + 2 + … + 31");
        assert_eq!(c.succeeded(), 32, "never above the maximum");
    }
}
