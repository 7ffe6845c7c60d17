//! `/badge/status.svg?job=&instance=` and `/badge/uptime.svg?job=&instance=&window=24h`:
//! badges to put in a README or a wiki, like Gatus's. Never cached by browsers or
//! proxies: they are current when shown.

use super::history::{self, TargetQuery};
use super::svg;
use crate::app::App;
use crate::history::HistoryState;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

fn svg_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "image/svg+xml; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache, max-age=0"),
        ],
        body,
    )
        .into_response()
}

pub async fn status(State(app): State<Arc<App>>, Query(q): Query<TargetQuery>) -> Response {
    let key = match q.target() {
        Ok(k) => k,
        Err(_) => {
            return svg_response(
                StatusCode::BAD_REQUEST,
                svg::badge("status", "job= and instance= needed", "#9f9f9f"),
            );
        }
    };
    let snapshot = app.hub.snapshot().await;
    match history::current_state(&snapshot, &key) {
        Some(state) => svg_response(
            StatusCode::OK,
            svg::badge("status", state.as_str(), svg::colour(state)),
        ),
        None => svg_response(
            StatusCode::NOT_FOUND,
            svg::badge("status", "unknown target", "#9f9f9f"),
        ),
    }
}

pub async fn uptime(State(app): State<Arc<App>>, Query(q): Query<TargetQuery>) -> Response {
    let retention = app.hub.config().history.retention;
    let (key, window) = match q.target_and_window(retention) {
        Ok(v) => v,
        Err(_) => {
            return svg_response(
                StatusCode::BAD_REQUEST,
                svg::badge("uptime", "job=, instance=, window=24h", "#9f9f9f"),
            );
        }
    };
    // As the user wrote it ("24h", not "1d").
    let label = format!("uptime {}", q.window.as_deref().unwrap_or("24h"));
    let now = crate::fleet::now_ms();
    let snapshot = app.hub.snapshot().await;
    let known = history::current_state(&snapshot, &key).is_some();
    let maintenance = snapshot.maintenance_intervals(&key, now - window.as_millis() as i64, now);
    let changes = {
        let history = app.outputs.history();
        let key = key.clone();
        tokio::task::spawn_blocking(move || {
            let from = now - window.as_millis() as i64;
            Ok::<_, crate::storage::StoreError>((
                history.state_changes(&key.0, &key.1, from)?,
                history.gaps(from)?,
            ))
        })
        .await
    };
    match changes {
        Ok(Ok((changes, gaps))) if known || !changes.is_empty() => {
            let excluded = crate::history::excluded(&gaps, &maintenance);
            let u = crate::history::durations(
                &changes,
                &excluded,
                now - window.as_millis() as i64,
                now,
            )
            .uptime();
            svg_response(
                StatusCode::OK,
                svg::badge(&label, &svg::percent(u), svg::uptime_colour(u)),
            )
        }
        Ok(Ok(_)) => svg_response(
            StatusCode::NOT_FOUND,
            svg::badge(&label, "unknown target", "#9f9f9f"),
        ),
        _ => svg_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            svg::badge(&label, "error", svg::colour(HistoryState::Down)),
        ),
    }
}
