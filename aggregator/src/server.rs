//! Starting and stopping the aggregator's listeners and background tasks as one unit,
//! for the binary and for tests.

use crate::app::App;
use crate::config::OpenFleet;
use crate::fleet::listener::FleetTlsError;
use crate::fleet::{FleetService, now_ms};
use sonde_proto::pb::fleet_server::FleetServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why the aggregator's listeners cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    OpenFleet(#[from] OpenFleet),
    /// `flag` is the command-line flag that set `address`.
    #[error("cannot listen on {flag} {address}: {source}")]
    Listen {
        flag: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot tell which address {flag} {address} was bound to: {source}")]
    LocalAddress {
        flag: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    FleetTls(#[from] FleetTlsError),
}

pub struct Running {
    pub app: Arc<App>,
    pub web_address: SocketAddr,
    pub grpc_address: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Binds both listeners (so a port clash fails start-up with a clear message), then
/// serves until [`Running::shutdown`]. The web server gets the default
/// [`crate::web::Options`] (no lifecycle API); see [`start_with`].
pub async fn start(
    app: Arc<App>,
    web: SocketAddr,
    grpc: SocketAddr,
) -> Result<Running, ServeError> {
    start_with(app, web.into(), grpc).await
}

/// [`start`], with the web server's options (`--web.*` flags).
pub async fn start_with(
    app: Arc<App>,
    web: crate::web::Options,
    grpc: SocketAddr,
) -> Result<Running, ServeError> {
    // Before binding: a port that would be open to anyone is never opened.
    app.hub.config().check_listen_address(grpc)?;
    let (web_listener, web_address) = listen("--web.listen-address", web.listen_address).await?;
    let (grpc_listener, grpc_address) = listen("--grpc.listen-address", grpc).await?;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();

    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let router = crate::web::router(app.clone(), web.enable_lifecycle);
    let rx = stopped.clone();
    tasks.push(tokio::spawn(sonde_cli::http_server::serve(
        web_listener,
        router,
        web.limits,
        wait(rx),
    )));

    let config = app.hub.config();
    let limits = config.limits;
    app.fleet_tls.load(config.tls.as_ref())?;
    let _ = app.grpc_address.set(grpc_address);
    let builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(crate::fleet::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(crate::fleet::KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_max_header_list_size(16 << 10)
        .http2_max_pending_accept_reset_streams(Some(32))
        .max_frame_size(16 << 10);
    let max_message = limits.max_message_bytes.0 as usize;
    let service = FleetServer::new(FleetService {
        hub: app.hub.clone(),
        shutdown: stopped.clone(),
    })
    .max_decoding_message_size(max_message)
    // Assignments travel in parts of at most PART_BUDGET, so no message needs more.
    .max_encoding_message_size(crate::fleet::assignment::MAX_ENCODE_BYTES);
    let incoming = crate::fleet::listener::incoming(
        grpc_listener,
        app.fleet_tls.clone(),
        limits.max_connections,
        limits.tls_handshake_timeout.0,
        app.hub.refusals.clone(),
    );
    let rx = stopped.clone();
    let mut builder = builder;
    tasks.push(tokio::spawn(async move {
        if let Err(e) = builder
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, wait(rx))
            .await
        {
            tracing::error!(error = %e, "gRPC server failed");
        }
    }));

    let hub = app.hub.clone();
    let mut rx = stopped.clone();
    tasks.push(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = ticker.tick() => { hub.tick(now_ms()); }
                _ = rx.wait_for(|s| *s) => return,
            }
        }
    }));
    let alive_app = app.clone();
    let mut rx = stopped.clone();
    tasks.push(tokio::spawn(async move {
        // The history tells the aggregator's own gaps from its targets' states by these
        // marks; a SIGKILL loses at most this much of the last run.
        let mut ticker = tokio::time::interval(MARK_ALIVE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let stop = tokio::select! {
                _ = ticker.tick() => false,
                _ = rx.wait_for(|s| *s) => true,
            };
            if stop {
                return;
            }
            alive_app.mark_alive().await;
        }
    }));
    let history_app = app.clone();
    let mut rx = stopped.clone();
    tasks.push(tokio::spawn(async move {
        // Off the ingest path: folding and pruning take the store for a moment every
        // ten minutes, the first time a minute after start.
        let start = tokio::time::Instant::now() + HISTORY_PRUNE_FIRST;
        let mut ticker = tokio::time::interval_at(start, HISTORY_PRUNE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let stop = tokio::select! {
                _ = ticker.tick() => false,
                _ = rx.wait_for(|s| *s) => true,
            };
            if stop {
                return;
            }
            let app = history_app.clone();
            let pruned = tokio::task::spawn_blocking(move || {
                let limits = app.hub.config().history;
                let store = app.outputs.store();
                store.prune_history(limits, now_ms())
            })
            .await;
            match pruned {
                Ok(Ok(n)) if n > 0 => tracing::debug!(rows = n, "history folded and pruned"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(
                    error = %e,
                    "cannot prune the target history; it is tried again in ten minutes"
                ),
                Err(e) => tracing::warn!(error = %e, "history pruning stopped"),
            }
        }
    }));
    tracing::info!(web = %web_address, grpc = %grpc_address, "aggregator listening");
    Ok(Running {
        app,
        web_address,
        grpc_address,
        stop,
        tasks,
    })
}

/// Binds `address` (given by `flag`), and the address it got (the port, for `:0`).
async fn listen(
    flag: &'static str,
    address: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), ServeError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| ServeError::Listen {
            flag,
            address,
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::LocalAddress {
            flag,
            address,
            source,
        })?;
    Ok((listener, bound))
}

const MARK_ALIVE_EVERY: Duration = Duration::from_secs(5);
const HISTORY_PRUNE_FIRST: Duration = Duration::from_secs(60);
const HISTORY_PRUNE_EVERY: Duration = Duration::from_secs(600);

impl Running {
    /// Stops the listeners and the ticker, then flushes remote write for up to `grace`.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        // Agent streams end on the stop signal; drop the hub's handles on them too so
        // the servers' graceful shutdown has nothing left to wait for.
        self.app.hub.disconnect_all(now_ms()).await;
        for mut task in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                tracing::warn!("a server task did not stop within 5s; aborting it");
                task.abort();
            }
        }
        self.app.shutdown(grace).await;
    }
}
