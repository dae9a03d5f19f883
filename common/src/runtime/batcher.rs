//! Gathers single requests (acknowledge this message, send that one) into SQS batch calls of up
//! to ten, waiting at most a short linger for a batch to fill. Each submitter learns the outcome
//! of its own entry, because a batch call can succeed for some entries and fail for others.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Flush calls in flight at once, per batcher.
const MAX_FLUSHES: usize = 4;

/// The outcome of one entry; the error is a short code or message for logs.
pub type EntryResult = Result<(), String>;

type FlushFn<T> =
    dyn Fn(Vec<T>) -> Pin<Box<dyn Future<Output = Vec<EntryResult>> + Send>> + Send + Sync;

struct Entry<T> {
    item: T,
    /// Where the outcome goes; `None` when nobody waits for it.
    done: Option<oneshot::Sender<EntryResult>>,
    /// The longest this entry may wait for a batch to fill; `None`: the batcher's linger.
    linger: Option<Duration>,
}

/// A handle to submit entries; cheap to clone.
pub struct Batcher<T> {
    tx: mpsc::Sender<Entry<T>>,
    closed: CancellationToken,
}

impl<T> Clone for Batcher<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            closed: self.closed.clone(),
        }
    }
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the batching task. `flush` sends one batch (at most `max` entries) and returns one
    /// result per entry, in order. The task ends when every handle is dropped, or at
    /// [`Batcher::close`], once all flushes have finished; await the returned handle to know
    /// that.
    pub fn spawn<F, Fut>(
        max: usize,
        linger: Duration,
        flush: F,
    ) -> (Self, tokio::task::JoinHandle<()>)
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<EntryResult>> + Send + 'static,
    {
        // Bounded: a producer waits rather than buffer without limit.
        let (tx, rx) = mpsc::channel(max * 8);
        let flush: Arc<FlushFn<T>> = Arc::new(move |items| Box::pin(flush(items)));
        let closed = CancellationToken::new();
        let task = tokio::spawn(run(rx, max, linger, flush, closed.clone()));
        (Self { tx, closed }, task)
    }

    /// Sends what is queued at once, without lingering, and ends the task; entries submitted
    /// afterwards fail with `"batcher stopped"`. For shutdown, when handles may still be held
    /// by work that outlives it.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Submits one entry without waiting for its outcome (the flush logs and counts failures):
    /// waits only for room in the queue.
    ///
    /// # Errors
    /// `"batcher stopped"` when the batching task is gone.
    pub async fn enqueue(&self, item: T) -> EntryResult {
        self.tx
            .send(Entry {
                item,
                done: None,
                linger: None,
            })
            .await
            .map_err(|_| "batcher stopped".to_owned())
    }

    /// Submits one entry and waits for its outcome.
    ///
    /// # Errors
    /// The entry's failure, or `"batcher stopped"` when the batching task is gone.
    pub async fn submit(&self, item: T) -> EntryResult {
        self.submit_within(item, None).await
    }

    /// [`Batcher::submit`], waiting at most `linger` for a batch to fill (never longer than the
    /// batcher's own linger): a batch goes out as soon as its most pressed entry may wait no
    /// longer.
    ///
    /// # Errors
    /// The entry's failure, or `"batcher stopped"` when the batching task is gone.
    pub async fn submit_within(&self, item: T, linger: Option<Duration>) -> EntryResult {
        let (done, outcome) = oneshot::channel();
        self.tx
            .send(Entry {
                item,
                done: Some(done),
                linger,
            })
            .await
            .map_err(|_| "batcher stopped".to_owned())?;
        outcome
            .await
            .unwrap_or_else(|_| Err("batcher stopped".to_owned()))
    }
}

async fn run<T: Send + 'static>(
    mut rx: mpsc::Receiver<Entry<T>>,
    max: usize,
    linger: Duration,
    flush: Arc<FlushFn<T>>,
    closed: CancellationToken,
) {
    let flushes = TaskTracker::new();
    // Flushes run concurrently so that gathering the next batch never waits on the network, at
    // most MAX_FLUSHES at once: when calls stall, the batcher waits, its queue fills and
    // submitters wait in turn (the in-flight cap then stops new receives), instead of calls and
    // entries piling up without bound.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_FLUSHES));
    let send = |batch: Vec<Entry<T>>, slot: tokio::sync::OwnedSemaphorePermit| {
        let flush = Arc::clone(&flush);
        flushes.spawn(async move {
            let _slot = slot;
            let (items, dones): (Vec<T>, Vec<_>) =
                batch.into_iter().map(|e| (e.item, e.done)).unzip();
            let count = items.len();
            let mut results = flush(items).await;
            results.resize(count, Err("no result for entry".to_owned()));
            for (done, result) in dones.into_iter().zip(results) {
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
        });
    };
    loop {
        let first = tokio::select! {
            biased;
            () = closed.cancelled() => break,
            entry = rx.recv() => match entry {
                Some(entry) => entry,
                None => break,
            },
        };
        let started = Instant::now();
        // The batch waits until its most pressed entry's linger is up.
        let until = |entry: &Entry<T>, arrived: Instant| {
            arrived + entry.linger.map_or(linger, |own| own.min(linger))
        };
        let mut deadline = until(&first, started);
        let mut batch = Vec::with_capacity(max);
        batch.push(first);
        // What is already waiting is taken without a timer; only a batch still short waits
        // (one timer for the whole linger, not one per entry).
        while batch.len() < max {
            match rx.try_recv() {
                Ok(entry) => {
                    deadline = deadline.min(until(&entry, started));
                    batch.push(entry);
                }
                Err(_) => break,
            }
        }
        if batch.len() < max && deadline > Instant::now() {
            let lingering = tokio::time::sleep_until(deadline);
            tokio::pin!(lingering);
            while batch.len() < max {
                tokio::select! {
                    biased;
                    () = closed.cancelled() => break,
                    entry = rx.recv() => match entry {
                        Some(entry) => {
                            let sooner = until(&entry, Instant::now());
                            batch.push(entry);
                            if sooner < deadline {
                                deadline = sooner;
                                lingering.as_mut().reset(deadline);
                            }
                        }
                        None => break,
                    },
                    () = &mut lingering => break,
                }
            }
        }
        send(batch, flush_slot(&slots).await);
    }
    // Closed (or every handle dropped): what is queued goes out now, in full batches.
    rx.close();
    let mut rest = Vec::new();
    while let Ok(entry) = rx.try_recv() {
        rest.push(entry);
    }
    while !rest.is_empty() {
        let batch: Vec<_> = rest.drain(..rest.len().min(max)).collect();
        send(batch, flush_slot(&slots).await);
    }
    flushes.close();
    flushes.wait().await;
}

/// A free flush slot, waited for.
async fn flush_slot(slots: &Arc<tokio::sync::Semaphore>) -> tokio::sync::OwnedSemaphorePermit {
    Arc::clone(slots)
        .acquire_owned()
        .await
        .expect("the flush slots are never closed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test(start_paused = true)]
    async fn closing_sends_what_is_queued_at_once_though_a_handle_is_still_held() {
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&flushed);
        let (batcher, task) =
            Batcher::spawn(10, Duration::from_secs(3600), move |items: Vec<u32>| {
                seen.lock().unwrap().extend(items.iter().copied());
                let n = items.len();
                async move { vec![Ok(()); n] }
            });
        for i in 0..3 {
            batcher.enqueue(i).await.unwrap();
        }
        tokio::task::yield_now().await;
        assert!(
            flushed.lock().unwrap().is_empty(),
            "lingering for a full batch"
        );
        let started = tokio::time::Instant::now();
        batcher.close();
        task.await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO, "no linger once closed");
        assert_eq!(*flushed.lock().unwrap(), vec![0, 1, 2]);
        assert_eq!(
            batcher.enqueue(9).await.unwrap_err(),
            "batcher stopped",
            "the handle outlived the task"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_flushes_stop_the_submitters_instead_of_piling_up() {
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let calls = Arc::clone(&started);
        let (batcher, task) = Batcher::spawn(10, Duration::ZERO, move |items: Vec<u32>| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let n = items.len();
            async move {
                // A call that hangs for an hour.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                vec![Ok(()); n]
            }
        });
        let mut accepted = 0;
        for i in 0..10_000u32 {
            let enqueued = tokio::time::timeout(Duration::from_secs(1), batcher.enqueue(i)).await;
            if enqueued.is_err() {
                break;
            }
            accepted += 1;
        }
        let calls = started.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(calls, MAX_FLUSHES, "at most {MAX_FLUSHES} calls at once");
        assert!(
            accepted <= 10 * (MAX_FLUSHES + 1) + 80 + 1,
            "entries held are bounded: {accepted} accepted before a submitter had to wait"
        );
        // Closing sends the rest, in batches, as the hung calls end.
        batcher.close();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_goes_out_when_its_most_pressed_entry_may_wait_no_longer() {
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&flushed);
        let (batcher, task) =
            Batcher::spawn(10, Duration::from_secs(10), move |items: Vec<u32>| {
                seen.lock()
                    .unwrap()
                    .push((tokio::time::Instant::now(), items.clone()));
                async move { vec![Ok(()); items.len()] }
            });
        let t0 = tokio::time::Instant::now();
        // One entry that may wait 100 ms: the batch waits 100 ms, not the batcher's 10 s.
        batcher
            .submit_within(1, Some(Duration::from_millis(100)))
            .await
            .unwrap();
        // An entry that may wait the batcher's linger, joined 50 ms later by one that may not
        // wait at all: both go out then.
        let patient = batcher.clone();
        let waiting = tokio::spawn(async move { patient.submit(2).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        batcher
            .submit_within(3, Some(Duration::ZERO))
            .await
            .unwrap();
        waiting.await.unwrap().unwrap();
        // A linger above the batcher's is the batcher's.
        let late = tokio::time::Instant::now();
        batcher
            .submit_within(4, Some(Duration::from_secs(60)))
            .await
            .unwrap();
        drop(batcher);
        task.await.unwrap();
        let flushed = flushed.lock().unwrap();
        let at: Vec<_> = flushed
            .iter()
            .map(|(at, items)| (*at, items.clone()))
            .collect();
        assert_eq!(at[0], (t0 + Duration::from_millis(100), vec![1]));
        assert_eq!(at[1].1, vec![2, 3]);
        assert_eq!(at[1].0 - at[0].0, Duration::from_millis(50));
        assert_eq!(at[2], (late + Duration::from_secs(10), vec![4]));
    }

    #[tokio::test]
    async fn entries_are_gathered_into_batches_and_answered_one_by_one() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&sizes);
        let (batcher, task) =
            Batcher::spawn(10, Duration::from_millis(50), move |items: Vec<u32>| {
                seen.lock().unwrap().push(items.len());
                async move {
                    items
                        .iter()
                        .map(|i| {
                            if i % 7 == 0 {
                                Err(format!("bad {i}"))
                            } else {
                                Ok(())
                            }
                        })
                        .collect()
                }
            });
        let results = futures::future::join_all((1..=25u32).map(|i| {
            let b = batcher.clone();
            async move { (i, b.submit(i).await) }
        }))
        .await;
        for (i, r) in results {
            assert_eq!(r.is_err(), i % 7 == 0, "entry {i}");
        }
        drop(batcher);
        task.await.unwrap();
        let sizes = sizes.lock().unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), 25);
        assert!(sizes.iter().all(|&n| n <= 10));
        assert!(
            sizes.len() <= 4,
            "25 entries submitted at once fit in three or four batches: {sizes:?}"
        );
    }
}
