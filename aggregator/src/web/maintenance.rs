//! `/api/v1/maintenance`: every maintenance window, where it comes from and whether it is
//! active now (GET); adding one (POST, the window as JSON) and deleting one (DELETE
//! `/api/v1/maintenance/NAME`), both only with `--web.enable-lifecycle`.

use crate::app::{App, MaintenanceError};
use crate::fleet::now_ms;
use crate::maintenance::{Source, Window, WindowSpec, format_rfc3339_ms};
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;

/// What POST and DELETE answer without `--web.enable-lifecycle`.
pub const LIFECYCLE_NEEDED: &str = "Adding and deleting maintenance windows through the API is off: start the aggregator with --web.enable-lifecycle to allow it (or add the window to the config file's maintenance: and reload).";

/// One window as `GET /api/v1/maintenance` shows it.
#[derive(Debug, Serialize)]
pub struct WindowView {
    #[serde(flatten)]
    pub spec: WindowSpec,
    pub source: Source,
    /// Active now.
    pub active: bool,
    /// The occurrence in progress, `[start, end)`.
    pub current: Option<Occurrence>,
    /// The next occurrence to start.
    pub next: Option<Occurrence>,
}

#[derive(Debug, Serialize)]
pub struct Occurrence {
    pub start: String,
    pub end: String,
}

fn occurrence((start, end): (i64, i64)) -> Occurrence {
    Occurrence {
        start: format_rfc3339_ms(start),
        end: if end == i64::MAX {
            "never".into()
        } else {
            format_rfc3339_ms(end)
        },
    }
}

/// A live window as the API shows it at `now_ms`.
pub fn view(window: &Window, now_ms: i64) -> WindowView {
    // The unclipped occurrence in progress: the one starting at or before now.
    let current = window.is_active(now_ms).then(|| {
        let start = match window.every_ms {
            Some(every) => window.start_ms + (now_ms - window.start_ms).div_euclid(every) * every,
            None => window.start_ms,
        };
        (start, start.saturating_add(window.duration_ms))
    });
    let after = current.map_or(now_ms, |(_, end)| end.max(now_ms + 1));
    WindowView {
        spec: window.spec(),
        source: window.source,
        active: current.is_some(),
        current: current.map(occurrence),
        next: window.occurrence_at_or_after(after).map(occurrence),
    }
}

fn error(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        Json(json!({"status": "error", "errorType": kind, "error": message})),
    )
        .into_response()
}

pub async fn list(State(app): State<Arc<App>>) -> Response {
    // From where additions and deletions are made, not from a snapshot of the hub that
    // may be half a second old: a window just deleted is not listed.
    let api = app.maintenance_api.lock().await;
    let config = app.hub.config();
    let now = now_ms();
    let windows: Vec<WindowView> = config
        .maintenance
        .iter()
        .chain(api.iter())
        .filter(|w| w.is_live())
        .map(|w| view(w, now))
        .collect();
    Json(json!({"status": "success", "data": windows})).into_response()
}

pub async fn forbidden() -> Response {
    error(StatusCode::FORBIDDEN, "forbidden", LIFECYCLE_NEEDED.into())
}

pub async fn add(
    State(app): State<Arc<App>>,
    body: Result<Json<WindowSpec>, JsonRejection>,
) -> Response {
    let spec = match body {
        Ok(Json(spec)) => spec,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_data",
                format!(
                    "the body is not a maintenance window ({e}); send JSON like {{\"name\": \"db-upgrade\", \"match\": {{\"job\": \"web\"}}, \"start\": \"2026-12-24T22:00:00Z\", \"duration\": \"2h\"}}"
                ),
            );
        }
    };
    let window = match spec.check(Source::Api) {
        Ok(w) => w,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_data",
                format!("maintenance window {:?}: {e}", spec.name),
            );
        }
    };
    let shown = view(&window, now_ms());
    match app.add_maintenance(window).await {
        Ok(()) => {
            tracing::info!(window = %spec.name, "maintenance window added through the API");
            Json(json!({"status": "success", "data": shown})).into_response()
        }
        Err(e) => failure(e),
    }
}

pub async fn delete(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    match app.delete_maintenance(&name).await {
        Ok(()) => {
            tracing::info!(window = %name, "maintenance window deleted through the API");
            Json(json!({"status": "success", "data": {"deleted": name}})).into_response()
        }
        Err(e) => failure(e),
    }
}

fn failure(e: MaintenanceError) -> Response {
    let status = match &e {
        MaintenanceError::NameTaken(_)
        | MaintenanceError::NameInConfig(_)
        | MaintenanceError::FromConfig(_) => StatusCode::CONFLICT,
        MaintenanceError::NotFound(_) => StatusCode::NOT_FOUND,
        MaintenanceError::Store(_) | MaintenanceError::Stopped(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    error(status, "maintenance", e.to_string())
}
