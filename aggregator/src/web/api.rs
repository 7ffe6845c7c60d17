//! `/api/v1/jobs`, `/api/v1/targets`, `/api/v1/agents`: the typed views of [`super::view`]
//! as JSON in Prometheus's API envelope (`{"status":"success","data":...}`).

use super::view;
use crate::app::App;
use crate::fleet::now_ms;
use axum::Json;
use axum::extract::State;
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Arc;

fn envelope(data: impl Serialize) -> Json<Value> {
    Json(json!({"status": "success", "data": data}))
}

pub async fn jobs(State(app): State<Arc<App>>) -> Json<Value> {
    envelope(view::jobs(&*app.hub.snapshot().await, now_ms()))
}

pub async fn targets(State(app): State<Arc<App>>) -> Json<Value> {
    envelope(view::targets(&*app.hub.snapshot().await, now_ms()))
}

pub async fn agents(State(app): State<Arc<App>>) -> Json<Value> {
    envelope(view::agents(&*app.hub.snapshot().await, now_ms()))
}
