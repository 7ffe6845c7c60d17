//! Process signals: SIGTERM/SIGINT stop the process gracefully, SIGHUP reloads.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn terminate() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
    }
}

/// The SIGHUPs that ask for a config reload.
pub struct Hangups(Option<Signal>);

impl Hangups {
    /// Starts listening. When SIGHUP cannot be listened for, this says so once and
    /// [`Hangups::recv`] never resolves: the process runs on without signal reloads.
    pub fn listen() -> Self {
        match signal(SignalKind::hangup()) {
            Ok(s) => Self(Some(s)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading by signal is off");
                Self(None)
            }
        }
    }

    /// Resolves at the next SIGHUP.
    pub async fn recv(&mut self) {
        if let Some(s) = &mut self.0
            && s.recv().await.is_some()
        {
            return;
        }
        std::future::pending().await
    }
}
