//! `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::health::Health;

/// Serves until the listener fails.
pub async fn serve(addr: SocketAddr, health: Health) -> Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the HTTP endpoint to {addr}"))?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, app).await.context("serving HTTP")
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.metrics.encode(),
    )
}

/// Healthy unless the desired-state loop is stalled: changes have waited, and the loop has not
/// turned, for longer than `runtime::health::STALLED_AFTER`.
async fn healthz(State(h): State<Health>) -> impl IntoResponse {
    match h.changes.stalled() {
        None => (StatusCode::OK, "ok".to_string()),
        Some(idle) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the desired-state loop has not turned for {}s while Kubernetes changes wait",
                idle.as_secs()
            ),
        ),
    }
}

/// Ready once every Kubernetes cache has synced (leader or not: a follower is a ready standby).
async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    if *h.synced.borrow() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet")
    }
}
