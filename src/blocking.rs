//! Blocking work done from async code without stalling the runtime: /proc reads whose cost
//! the target sets (a readlink per open fd, two files per thread), directory scans, audit-log
//! writes. sbmon serves from two worker threads, so one slow read on a worker would hold up
//! every other request queued on it.

/// Runs `f`, which may block, where it cannot hold up the runtime's other tasks.
///
/// On a worker of a multi-threaded runtime, the worker hands its queue to another thread for
/// the duration (`block_in_place`), so `f` needs no `'static` borrow and a caller can still
/// rely on its effect when this returns. Elsewhere (a blocking-pool thread, plain threads, a
/// current-thread runtime, where `block_in_place` would panic) `f` simply runs.
pub fn section<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Runs `f` on the blocking pool and waits for it; a panic in `f` resumes here, as if `f`
/// had run inline.
pub async fn run<T, F>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Only a runtime that is shutting down cancels a blocking task, and it drops this
        // future with it.
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_inline_outside_a_runtime_and_on_a_current_thread_runtime() {
        assert_eq!(section(|| 7), 7);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(async { section(|| 8) }), 8);
    }

    #[test]
    fn a_blocked_worker_does_not_hold_up_the_other_tasks() {
        // One worker only: without handing its queue over, the spawned task could not run
        // until the blocking section ended, and the section waits for that task.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let answered = rt.block_on(async {
            tokio::spawn(async {
                let (tx, rx) = std::sync::mpsc::channel();
                let other = tokio::spawn(async move { tx.send(()).unwrap() });
                let answered = section(|| rx.recv_timeout(std::time::Duration::from_secs(10)));
                other.await.unwrap();
                answered.is_ok()
            })
            .await
            .unwrap()
        });
        assert!(answered);
    }

    #[tokio::test]
    async fn run_returns_the_value_and_resumes_panics() {
        assert_eq!(run(|| 9).await, 9);
        let caught = tokio::spawn(run(|| -> u8 { panic!("boom") })).await;
        assert!(caught.unwrap_err().is_panic());
    }
}
