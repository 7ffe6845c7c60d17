//! The aggregator's HTTP side: status page, JSON API, `/metrics`, health and reload.

mod api;
mod badge;
mod fleet;
mod heartbeat;
mod history;
mod live;
pub mod maintenance;
mod metrics;
mod page;
mod report;
mod status;
mod svg;
mod target;
mod targets;
mod trace;
mod view;

use crate::app::App;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use sonde_cli::http_server::Limits;
use std::net::SocketAddr;
use std::sync::Arc;

/// How the web server listens, from the `--web.*` flags.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// `--web.listen-address`.
    pub listen_address: SocketAddr,
    /// `--web.enable-lifecycle`: serve `POST /-/reload` and the maintenance API's POST
    /// and DELETE (off by default, as in
    /// Prometheus: any caller of the HTTP endpoints could otherwise make the aggregator
    /// re-read its config).
    pub enable_lifecycle: bool,
    /// Header read timeout and connection limit.
    pub limits: Limits,
}

impl From<SocketAddr> for Options {
    /// The defaults: lifecycle API off, default limits.
    fn from(listen_address: SocketAddr) -> Self {
        Self {
            listen_address,
            enable_lifecycle: false,
            limits: Limits::default(),
        }
    }
}

/// What `POST /-/reload` answers without `--web.enable-lifecycle`, as Prometheus does.
pub const LIFECYCLE_DISABLED: &str = "Lifecycle API is not enabled.";

pub fn router(app: Arc<App>, enable_lifecycle: bool) -> Router {
    let reload_route = if enable_lifecycle {
        post(reload)
    } else {
        post(|| async { (StatusCode::FORBIDDEN, format!("{LIFECYCLE_DISABLED}\n")) })
    };
    let (add_window, delete_window) = if enable_lifecycle {
        (
            post(maintenance::add),
            axum::routing::delete(maintenance::delete),
        )
    } else {
        (
            post(maintenance::forbidden),
            axum::routing::delete(maintenance::forbidden),
        )
    };
    Router::new()
        .route("/", get(status::page))
        .route("/metrics", get(metrics::handler))
        .route("/api/v1/jobs", get(api::jobs))
        .route("/api/v1/targets", get(api::targets))
        .route("/api/v1/agents", get(api::agents))
        .route("/api/v1/status", get(live::handler))
        .route("/targets", get(targets::page))
        .route("/api/v1/targets/history", get(history::handler))
        .route(
            "/api/v1/maintenance",
            get(maintenance::list).merge(add_window),
        )
        .route("/api/v1/maintenance/{name}", delete_window)
        .route("/api/v1/report", get(report::api))
        .route("/report", get(report::page))
        .route("/target", get(target::page))
        .route("/fleet", get(fleet::page))
        .route("/badge/uptime.svg", get(badge::uptime))
        .route("/badge/status.svg", get(badge::status))
        .route("/-/healthy", get(|| async { "Healthy.\n" }))
        .route("/-/ready", get(ready))
        .route("/-/reload", reload_route)
        .layer(axum::Extension(Arc::new(live::Live::default())))
        .with_state(app)
}

/// 200 "Ready." once the config is loaded and the queues restored (both done before the
/// server starts) while the store takes commits; 503 with the reason otherwise.
async fn ready(State(app): State<Arc<App>>) -> impl IntoResponse {
    match app.readiness() {
        Ok(()) => (StatusCode::OK, "Ready.\n".to_string()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Not ready: {reason}\n"),
        ),
    }
}

async fn reload(State(app): State<Arc<App>>) -> impl IntoResponse {
    match app.reload().await {
        Ok(()) => (StatusCode::OK, "config reloaded\n".to_string()),
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the running config");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reload failed, the running config is kept: {e}\n"),
            )
        }
    }
}
