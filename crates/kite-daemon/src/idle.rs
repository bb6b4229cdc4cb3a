//! A pool of `SCHED_IDLE` threads for the background prefetch's CPU work
//! (decoding and verifying chunks): the kernel runs them only on CPU time
//! no normal thread wants, so a node's workloads never wait for the
//! background behind the CPU (readers' own fetches decode on tokio's
//! blocking pool as before). SCHED_IDLE threads still get a small share
//! when every core is busy, so work queued here always finishes.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

static POOL: OnceLock<mpsc::Sender<Job>> = OnceLock::new();

fn pool() -> &'static mpsc::Sender<Job> {
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        for k in 0..n {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("kite-idle-{k}"))
                .spawn(move || {
                    if let Err(e) = kite_kernel::sched::make_current_thread_idle() {
                        tracing::warn!("background decode thread keeps the normal policy: {e}");
                    }
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(p) => p.into_inner().recv(),
                        };
                        let Ok(job) = job else { return };
                        // A panicking job drops its reply sender (the
                        // caller sees an error); the thread stays.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("starting a background decode thread: {e}");
            }
        }
        tx
    })
}

/// Run `f` on the idle pool and wait for its result; Err if it panicked
/// or no pool thread could be started.
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    pool()
        .send(job)
        .map_err(|_| "no background decode thread".to_string())?;
    rx.await
        .map_err(|_| "background decode task failed".to_string())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn jobs_run_and_a_panic_is_an_error() {
        assert_eq!(super::run(|| 6 * 7).await, Ok(42));
        let r: Result<(), String> = super::run(|| panic!("boom")).await;
        assert!(r.is_err());
        // The pool survives the panic.
        assert_eq!(super::run(|| "still here").await, Ok("still here"));
    }
}
