//! The aggregator's HTTP side: status page, JSON API, `/metrics`, health and reload.

mod api;
mod metrics;
mod status;

use crate::app::App;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use std::sync::Arc;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(status::page))
        .route("/metrics", get(metrics::handler))
        .route("/api/v1/jobs", get(api::jobs))
        .route("/api/v1/targets", get(api::targets))
        .route("/api/v1/agents", get(api::agents))
        .route("/-/healthy", get(|| async { "Healthy.\n" }))
        .route("/-/ready", get(|| async { "Ready.\n" }))
        .route("/-/reload", post(reload))
        .with_state(app)
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
