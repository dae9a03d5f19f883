//! The async runtime a worker process runs on.
//!
//! One thread by default: a worker waits on SQS and DynamoDB, and its tasks hand work to each
//! other (a receive to its jobs, a job to the acknowledgement batcher, a batch to its delete
//! call). On a multi-threaded runtime each hand-off may wake the other thread, a system call
//! and a context switch: measured with `loadtest --runtime`, that was 5 µs of CPU per message
//! of the runtime's 30 (loadtest/README.md). One thread also fits the tasks deploy/ runs (256
//! to 1,024 CPU units, at most one vCPU); a task of 2,048 units can run two
//! (`--threads 2`).

use std::num::NonZeroUsize;

/// The environment variable behind `worker --threads`.
pub const THREADS_ENV: &str = "FLEET_WORKER_THREADS";

/// A runtime of `threads` threads: a current-thread runtime for one, else a multi-threaded one
/// with that many workers.
///
/// # Errors
/// When the operating system refuses the runtime's threads or I/O driver.
pub fn tokio_runtime(threads: NonZeroUsize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads.get() == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.get())
            .enable_all()
            .build()
    }
}

/// Parses a thread count for a command line: a whole number of at least 1.
///
/// # Errors
/// What to write instead.
pub fn parse_threads(s: &str) -> Result<NonZeroUsize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) | Err(_) => Err(format!(
            "`{s}` is not a thread count: give a whole number of at least 1 (1 suits a task of up to one vCPU)"
        )),
        Ok(n) => Ok(NonZeroUsize::new(n).expect("not zero")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_count_is_a_whole_number_of_at_least_one() {
        assert_eq!(parse_threads("1").unwrap().get(), 1);
        assert_eq!(parse_threads("4").unwrap().get(), 4);
        for bad in ["0", "-1", "two", ""] {
            let e = parse_threads(bad).unwrap_err();
            assert!(e.contains("at least 1"), "{bad}: {e}");
        }
    }

    #[test]
    fn one_thread_is_a_current_thread_runtime_and_more_are_multi_threaded() {
        use tokio::runtime::RuntimeFlavor;
        let one = tokio_runtime(NonZeroUsize::new(1).unwrap()).unwrap();
        assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        let two = tokio_runtime(NonZeroUsize::new(2).unwrap()).unwrap();
        assert_eq!(two.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(two.metrics().num_workers(), 2);
    }
}
