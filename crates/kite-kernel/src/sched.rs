//! Thread scheduling: background work that runs only on otherwise idle CPU.

/// Put the calling thread in the `SCHED_IDLE` policy: the kernel runs it
/// only when no normal thread wants the CPU, so work done there (the
/// daemon's background prefetch decoding) never takes CPU time from the
/// workload. The policy stays with the thread.
pub fn make_current_thread_idle() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads `param` (a valid, initialized
    // sched_param on our stack for the duration of the call) and changes
    // only the scheduling policy of the calling thread (pid 0); it touches
    // no memory of ours.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_thread_gets_sched_idle() {
        std::thread::spawn(|| {
            super::make_current_thread_idle().expect("SCHED_IDLE needs no privilege");
            // SAFETY: sched_getscheduler only reads the calling thread's policy.
            let policy = unsafe { libc::sched_getscheduler(0) };
            assert_eq!(policy, libc::SCHED_IDLE);
        })
        .join()
        .unwrap();
    }
}
