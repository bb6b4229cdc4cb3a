//! SIGTERM and SIGINT during `kite convert`: the conversion stops and
//! leaves nothing behind, then kite exits with 128 + the signal number.
//!
//! The first signal raises the conversion's [`Interrupt`]; the converter
//! sees it at its next tar entry or chunk, removes its staging directory
//! and returns [`ConvertError::Interrupted`]. A conversion blocked on a
//! read (a stalled registry, a pipe) never gets there: after [`GRACE`], or
//! at a second signal, the watcher removes the staging directory itself
//! and exits. Before [`watch`] the signals keep their default action
//! (nothing to clean up yet); a SIGKILLed conversion's staging directory
//! is removed by the next conversion to the same output.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use kite_convert::{ConvertError, Interrupt};
use tokio::signal::unix::{signal, SignalKind};

/// How long a conversion may take to stop before the watcher removes its
/// staging directory under it.
pub const GRACE: Duration = Duration::from_secs(5);

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

/// The signal that interrupted a conversion, once one has.
pub struct Watch {
    signal: Arc<AtomicI32>,
}

/// Turn SIGTERM and SIGINT into `interrupt` being raised, on `rt`.
pub fn watch(rt: &tokio::runtime::Runtime, interrupt: Interrupt) -> Result<Watch> {
    let _ctx = rt.enter();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let got = Arc::new(AtomicI32::new(0));
    let seen = Arc::clone(&got);
    rt.spawn(async move {
        let signo = tokio::select! {
            _ = term.recv() => SIGTERM,
            _ = int.recv() => SIGINT,
        };
        seen.store(signo, Ordering::SeqCst);
        interrupt.raise();
        tokio::select! {
            _ = tokio::time::sleep(GRACE) => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if let Some(dir) = interrupt.remove_staging() {
            eprintln!(
                "kite: error: interrupted ({}); the conversion did not stop, removed {}",
                name(signo),
                dir.display()
            );
        }
        std::process::exit(128 + signo);
    });
    Ok(Watch { signal: got })
}

impl Watch {
    /// Pass `e` through, unless it says the conversion was interrupted by
    /// a signal: then say so and exit with 128 + its number.
    pub fn exit_if_interrupted(&self, e: ConvertError) -> ConvertError {
        let signo = self.signal.load(Ordering::SeqCst);
        if matches!(e, ConvertError::Interrupted) && signo != 0 {
            eprintln!(
                "kite: error: interrupted ({}); nothing was written",
                name(signo)
            );
            std::process::exit(128 + signo);
        }
        e
    }
}

fn name(signo: i32) -> &'static str {
    if signo == SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    }
}
