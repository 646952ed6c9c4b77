//! Stopping a batch job cleanly on SIGINT (Ctrl-C) or SIGTERM (a
//! Kubernetes Job being deleted, `docker stop`): the first signal asks the
//! job to stop handing out work; what is in flight finishes and is recorded,
//! the summary is printed, and the process exits with 128 + the signal's
//! number. A second signal ends the process at once with that status (what
//! was recorded stays; a rerun continues).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

/// SIGINT's number.
pub const SIGINT: i32 = 2;
/// SIGTERM's number.
pub const SIGTERM: i32 = 15;

/// Set by a signal handler, read by the job. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicI32>);

impl Interrupt {
    /// Never set unless [`Interrupt::raise`] is called (tests, library use).
    pub fn new() -> Self {
        Self::default()
    }

    /// One that SIGINT and SIGTERM set. The handlers live on their own
    /// thread for the rest of the process.
    pub fn on_signals() -> std::io::Result<Self> {
        let it = Interrupt::new();
        let set = it.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Register before returning, so that a signal right after start is seen.
        #[cfg(unix)]
        let (mut int, mut term) = {
            use tokio::signal::unix::{signal, SignalKind};
            let _guard = rt.enter();
            (
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            )
        };
        std::thread::Builder::new()
            .name("lumen-signals".into())
            .spawn(move || {
                rt.block_on(async move {
                    loop {
                        #[cfg(unix)]
                        let signal = tokio::select! {
                            Some(()) = int.recv() => SIGINT,
                            Some(()) = term.recv() => SIGTERM,
                            else => return,
                        };
                        #[cfg(not(unix))]
                        let signal = match tokio::signal::ctrl_c().await {
                            Ok(()) => SIGINT,
                            Err(_) => return,
                        };
                        if set.raised().is_some() {
                            eprintln!("second signal: stopping now; a rerun continues");
                            std::process::exit(128 + signal);
                        }
                        set.raise(signal);
                    }
                })
            })?;
        Ok(it)
    }

    /// Ask the job to stop, as `signal` would.
    pub fn raise(&self, signal: i32) {
        let _ = self
            .0
            .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The signal that asked the job to stop, if one did.
    pub fn raised(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
}

/// A signal's name, for messages.
pub fn signal_name(signal: i32) -> String {
    match signal {
        SIGINT => "SIGINT".into(),
        SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_signal_is_kept() {
        let i = Interrupt::new();
        assert_eq!(i.raised(), None);
        let shared = i.clone();
        shared.raise(SIGTERM);
        i.raise(SIGINT);
        assert_eq!(i.raised(), Some(SIGTERM));
        assert_eq!(signal_name(SIGTERM), "SIGTERM");
    }
}
