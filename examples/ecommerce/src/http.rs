//! The HTTP API (axum): orders, inventory, analytics, the DLQ processor,
//! Prometheus metrics and health.
//!
//! ## Who may call what
//!
//! Every route but `GET /health` and `GET /metrics` needs an
//! `Authorization: Bearer <token>` header with a configured token (see
//! [`crate::auth`] for the configuration); without one, or with an unknown
//! one, the answer is 401 with `WWW-Authenticate: Bearer`; a token whose
//! role may not do it gets 403.
//!
//! | route | customer token (customer id `c`) | operator token |
//! |---|---|---|
//! | `GET /health`, `GET /metrics` | open, no token needed | open |
//! | `POST /orders` | for `customer_id` `c` only (else 403) | for any customer |
//! | `GET /orders` | `c`'s orders | every order |
//! | `GET /orders/{id}`, `…/timeline` | `c`'s orders; another's is 404, as if it did not exist | any |
//! | `GET /catalogue`, `GET /inventory`, `GET /inventory/{sku}` | yes | yes |
//! | `GET /analytics` | 403 | yes |
//! | `GET /dlq…`, `POST /dlq/{id}/…` (customers' emails) | 403 | yes |
//! | `GET /sagas…`, `POST /sagas/{id}/…`, `GET /sagas/definition` | 403 | yes |
//! | `GET /ui` (the operators' page, see [`crate::ui`]) | open: the page asks for a token | open |
//!
//! `/health` and `/metrics` are open so load balancers and Prometheus need
//! no secret: they show counts and partitions, no customer data. Another
//! customer's order answers 404, not 403, so a customer cannot learn which
//! order ids exist. The DLQ archive records the operator's configured
//! name as who acted (an `X-Operator` header or an `operator` field is
//! not taken).
//!
//! `POST` routes take `Content-Type: application/json` only (415
//! otherwise, even with an empty body), so a web page cannot post to the
//! API with a plain form.
//!
//! ## Prices
//!
//! An order line costs the catalogue's price (`GET /catalogue`): a
//! `unit_price` in the request is optional; equal to the catalogue's it is
//! accepted, different it is refused with 422 (`"field":
//! "items[0].unit_price"`) and nothing is placed.
//!
//! ## Errors
//!
//! Every error is JSON: `{"error": "...", "field": "items[0].quantity"}`;
//! 4xx when the request is wrong, 503 with `"retryable": true` and a
//! `Retry-After` header when the runtime could not take the write in time
//! (the broker away: within the runtime's request timeout, 5 s by
//! default). `POST /orders` takes an `Idempotency-Key` header: retries of a
//! request with the same key (and the same customer) return the same
//! order, never a second one, so a client retries a 503 or a lost answer
//! safely. The same key with other items is refused with 422.
//!
//! ## Tracing
//!
//! `POST /orders` continues the trace of a W3C `traceparent` request
//! header (a malformed one is ignored: a new trace starts) and answers
//! with a `traceparent` header, the request's span in that trace: the
//! order's saga, its participants and notification attempts all run in
//! it. `GET /sagas/{id}` shows the saga's `trace_id`.
//!
//! `GET /health` answers 200 when the runtime serves every partition, and
//! 503 with the problems (a partition that cannot be restored or written,
//! batches failing while the broker is away) otherwise.
//!
//! A process that runs only some services (Kafka, one service per process)
//! serves the same routes; those of services it does not run answer 404
//! with `"this process does not run the X service"`.

use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Extension, Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use saga_core::{
    Operation, OperatorAction, SagaError, SagaInstance, SagaQuery, StatusFilter, Timestamp,
    TraceContext, TRACEPARENT_HEADER,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{ApiTokens, Caller, Role};
use crate::dlq::DlqError;
use crate::order::{Order, OrderRequest, OrderView};
use crate::system::{PlaceError, System};

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// What was wrong.
    pub error: String,
    /// Which field, if one.
    pub field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            field: None,
        }
    }

    fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, what)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Only a 503 says "try again": a 500 is a fault retrying does not fix.
        let retryable = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut body = json!({ "error": self.error });
        if let Some(f) = self.field {
            body["field"] = Value::String(f);
        }
        if retryable {
            body["retryable"] = Value::Bool(true);
        }
        let mut res = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"ecommerce\""),
            );
        }
        res
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The caller of a route that needs a token: whose token the
/// `Authorization: Bearer` header carries (401 without a known one).
struct Authed(Caller);

impl<S: Send + Sync> FromRequestParts<S> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let unauthorized = |why: &str| ApiError::new(StatusCode::UNAUTHORIZED, why);
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("this endpoint needs an `Authorization: Bearer` token"))?
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| token.trim().to_owned())
            })
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
        parts
            .extensions
            .get::<Arc<ApiTokens>>()
            .and_then(|tokens| tokens.authenticate(&presented).cloned())
            .map(Authed)
            .ok_or_else(|| unauthorized("unknown token"))
    }
}

/// The caller of an operator's route: 401 without a known token, 403 with
/// a customer's.
struct Operator(Caller);

impl<S: Send + Sync> FromRequestParts<S> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Authed(caller) = Authed::from_request_parts(parts, state).await?;
        if caller.role == Role::Operator {
            Ok(Operator(caller))
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this endpoint is for operators",
            ))
        }
    }
}

/// 415 unless the request says its body is JSON (`application/json`,
/// parameters such as `charset` allowed): a web page's plain form cannot
/// send that without the browser asking the API first (CORS), which it
/// does not allow.
fn require_json(headers: &HeaderMap) -> ApiResult<()> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if is_json {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            error: "Content-Type must be application/json".into(),
            field: Some("Content-Type".into()),
        })
    }
}

fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body too large: at most {MAX_BODY_BYTES} bytes"),
        )
    } else {
        ApiError::new(
            rejection.status(),
            format!("cannot read the request body: {}", rejection.body_text()),
        )
    }
}

fn not_here(service: &str) -> ApiError {
    ApiError::not_found(format!("this process does not run the {service} service"))
}

fn part<'a, T>(x: &'a Option<T>, service: &str) -> ApiResult<&'a T> {
    x.as_ref().ok_or_else(|| not_here(service))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "invalid request",
            _ => "invalid JSON",
        };
        ApiError::new(StatusCode::BAD_REQUEST, format!("{what}: {e}"))
    })
}

/// The buckets of every `*_seconds` histogram (0.5 s among them: the
/// alert on p99 message processing is exact), see `docs/METRICS.md`.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// The buckets of `saga_kafka_batch_messages` (inputs per batch; a batch
/// holds at most 5,000 by default).
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// The process-wide Prometheus recorder (installed once). Histograms are
/// exported as Prometheus histograms (`_bucket`, `_sum`, `_count`), which
/// alert rules and dashboards aggregate across instances.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("saga_kafka_batch_messages".into()),
                        BATCH_BUCKETS,
                    )
                })
                .expect("the buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics shows only what this one sees");
            }
            handle
        })
        .clone()
}

/// The API over `system`, for the callers of `tokens` (see
/// [`crate::auth`]; with no token, only `/health` and `/metrics` answer).
pub fn router(system: Arc<System>, tokens: ApiTokens) -> Router {
    let _ = metrics_handle();
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/ui", get(crate::ui::page))
        .route("/ui/app.js", get(crate::ui::script))
        .route("/ui/app.css", get(crate::ui::style))
        .route("/catalogue", get(catalogue))
        .route("/orders", post(create_order).get(list_orders))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/timeline", get(get_timeline))
        .route("/inventory", get(list_inventory))
        .route("/inventory/{sku}", get(get_inventory))
        .route("/analytics", get(analytics))
        .route("/sagas", get(list_sagas))
        .route("/sagas/definition", get(saga_definition))
        .route("/sagas/{id}", get(get_saga))
        .route("/sagas/{id}/retry", saga_action(OperatorAction::Retry))
        .route("/sagas/{id}/skip", saga_action(OperatorAction::Skip))
        .route("/sagas/{id}/abort", saga_action(OperatorAction::Abort))
        .route("/dlq", get(list_dlq))
        .route("/dlq/archive", get(dlq_archive))
        .route("/dlq/{id}", get(get_dlq))
        .route("/dlq/{id}/retry", dlq_action(DlqAction::Retry))
        .route("/dlq/{id}/discard", dlq_action(DlqAction::Discard))
        .route("/dlq/{id}/alert", dlq_action(DlqAction::Alert))
        .route("/dlq/{id}/sms", dlq_action(DlqAction::Sms))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(axum::middleware::map_response(json_errors))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(Extension(Arc::new(tokens)))
        .with_state(system)
}

/// Errors the router answers itself (a path parameter it cannot decode,
/// a method a route does not take) come as plain text or empty: they are
/// made JSON as every other error, keeping their status and headers
/// (`Allow` on a 405).
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 4 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let error = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    let body = json!({ "error": error }).to_string();
    Response::from_parts(parts, axum::body::Body::from(body))
}

async fn health(State(s): State<Arc<System>>) -> Response {
    let health = s.health();
    let status = if health.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let problems: Vec<Value> = health
        .problems
        .iter()
        .map(|p| {
            json!({
                "component": p.component,
                "partition": p.partition,
                "error": p.error,
                "since": p.since,
            })
        })
        .collect();
    let body = json!({
        "status": if health.is_ok() { "ok" } else { "degraded" },
        "runtime": s.runtime_name(),
        "services": s.services.names(),
        "topic_prefix": s.topics.prefix(),
        "problems": problems,
    });
    (status, Json(body)).into_response()
}

async fn metrics_text(State(s): State<Arc<System>>) -> impl IntoResponse {
    let handle = metrics_handle();
    if let Some(dlq) = &s.dlq {
        metrics::gauge!("ecommerce_dlq_open").set(dlq.open_count() as f64);
    }
    for (group, channel, lag) in s.lag() {
        metrics::gauge!("ecommerce_consumer_lag", "group" => group, "channel" => channel)
            .set(lag as f64);
    }
    if let Some(a) = s.analytics.as_ref().map(|a| a.summary()) {
        metrics::gauge!("ecommerce_orders", "status" => "created").set(a.orders_created as f64);
        metrics::gauge!("ecommerce_orders", "status" => "confirmed").set(a.orders_confirmed as f64);
        metrics::gauge!("ecommerce_orders", "status" => "cancelled").set(a.orders_cancelled as f64);
    }
    handle.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
}

async fn create_order(
    State(s): State<Arc<System>>,
    Authed(caller): Authed,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    require_json(&headers)?;
    if !s.services.order {
        return Err(not_here("order"));
    }
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "Idempotency-Key: not visible ASCII".into(),
            field: Some("Idempotency-Key".into()),
        })?),
    };
    let body = body.map_err(body_error)?;
    let req: OrderRequest = parse_json(&body)?;
    if !caller.may_act_for(&req.customer_id) {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            error: format!(
                "the token of customer `{}` cannot place orders for `{}`",
                caller.name, req.customer_id
            ),
            field: Some("customer_id".into()),
        });
    }
    // The request's span continues the caller's trace (a W3C
    // `traceparent` header) or starts one; the saga runs in it.
    let incoming = match headers.get(TRACEPARENT_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => TraceContext::parse(v.trim())
            .map_err(|e| tracing::warn!(error = %e, "malformed traceparent header ignored"))
            .ok(),
        Some(Err(_)) => {
            tracing::warn!("traceparent header: not visible ASCII, ignored");
            None
        }
    };
    let span = tracing::info_span!(
        "api.create_order",
        customer_id = %req.customer_id,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
    );
    let trace = saga_core::trace::link_span(&span, incoming.as_ref());
    let placed =
        tracing::Instrument::instrument(s.place_order_traced(&req, key, Some(trace)), span).await;
    match placed {
        Ok(order) => {
            let location = format!("/orders/{}", order.order_id);
            let body = json!({
                "order_id": order.order_id,
                "status": order.status,
                "total": order.total,
            });
            Ok((
                StatusCode::ACCEPTED,
                [
                    (header::LOCATION, location),
                    (
                        header::HeaderName::from_static(TRACEPARENT_HEADER),
                        trace.to_string(),
                    ),
                ],
                Json(body),
            )
                .into_response())
        }
        Err(PlaceError::Invalid(inv)) => Err(ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            error: format!("{}: {}", inv.field, inv.message),
            field: Some(inv.field),
        }),
        Err(PlaceError::Unavailable(msg)) => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, msg))
        }
        Err(PlaceError::Refused(msg)) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg)),
        Err(PlaceError::KeyReused(msg)) => Err(ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            error: msg,
            field: Some("Idempotency-Key".into()),
        }),
    }
}

fn storage_error(e: String) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("cannot read the order store: {e}"),
    )
}

/// Every order for an operator, the caller's own for a customer.
async fn list_orders(
    State(s): State<Arc<System>>,
    Authed(caller): Authed,
) -> ApiResult<Json<Value>> {
    if !s.services.order {
        return Err(not_here("order"));
    }
    let orders = s.orders().await.map_err(storage_error)?;
    let list: Vec<Value> = orders
        .into_iter()
        .filter(|o| caller.may_act_for(&o.data.customer_id))
        .map(|o| {
            json!({
                "order_id": o.data.order_id,
                "status": o.data.status,
                "total": o.data.total,
                "saga_status": o.status.name(),
            })
        })
        .collect();
    Ok(Json(json!({ "orders": list })))
}

/// Order `id` if `caller` may see it; another customer's order is 404,
/// as an unknown one.
async fn visible_order(
    s: &System,
    caller: &Caller,
    id: &str,
) -> ApiResult<saga_core::SagaInstance<crate::order::Order>> {
    if !s.services.order {
        return Err(not_here("order"));
    }
    match s.order(id).await.map_err(storage_error)? {
        Some(inst) if caller.may_act_for(&inst.data.customer_id) => Ok(inst),
        _ => Err(ApiError::not_found(format!("no order `{id}`"))),
    }
}

async fn get_order(
    State(s): State<Arc<System>>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<OrderView>> {
    Ok(Json(visible_order(&s, &caller, &id).await?.into()))
}

async fn get_timeline(
    State(s): State<Arc<System>>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    if caller.role != Role::Operator {
        visible_order(&s, &caller, &id).await?;
    }
    if !s.services.order {
        return Err(not_here("order"));
    }
    let lines = crate::timeline::of(&s, &id).await;
    if lines.is_empty() {
        return Err(ApiError::not_found(format!("no order `{id}`")));
    }
    Ok(Json(json!({ "order_id": id, "timeline": lines })))
}

/// The list price of every SKU: what an order line costs.
async fn catalogue(State(s): State<Arc<System>>, _: Authed) -> Json<Value> {
    let items: Vec<Value> = s
        .prices()
        .iter()
        .map(|(sku, price)| json!({"sku": sku, "unit_price": price}))
        .collect();
    Json(json!({ "items": items }))
}

/// The stock; on Kafka also its shards (one per partition of
/// `inventory.requests`, see `inventory.rs`) as this process has them.
async fn list_inventory(State(s): State<Arc<System>>, _: Authed) -> ApiResult<Json<Value>> {
    let inv = part(&s.inventory, "inventory")?;
    let mut body = json!({ "stock": inv.levels() });
    if inv.is_sharded() {
        body["shards"] = json!(inv.shards());
    }
    Ok(Json(body))
}

async fn get_inventory(
    State(s): State<Arc<System>>,
    _: Authed,
    Path(sku): Path<String>,
) -> ApiResult<Json<Value>> {
    part(&s.inventory, "inventory")?
        .level(&sku)
        .map(|l| Json(json!(l)))
        .ok_or_else(|| ApiError::not_found(format!("unknown SKU `{sku}`")))
}

async fn analytics(State(s): State<Arc<System>>, _: Operator) -> ApiResult<Json<Value>> {
    Ok(Json(json!(part(&s.analytics, "analytics")?.summary())))
}

async fn list_dlq(State(s): State<Arc<System>>, _: Operator) -> ApiResult<Json<Value>> {
    let dlq = part(&s.dlq, "dlq")?;
    Ok(Json(
        json!({ "open": dlq.open_count(), "entries": dlq.list() }),
    ))
}

async fn dlq_archive(State(s): State<Arc<System>>, _: Operator) -> ApiResult<Json<Value>> {
    let dlq = part(&s.dlq, "dlq")?;
    Ok(Json(
        json!({ "archive": dlq.archive(), "alerts": dlq.alerts() }),
    ))
}

async fn get_dlq(
    State(s): State<Arc<System>>,
    _: Operator,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    part(&s.dlq, "dlq")?
        .get(&id)
        .map(|e| Json(json!(e)))
        .ok_or_else(|| ApiError::not_found(format!("no dead letter `{id}`")))
}

/// The body of the DLQ actions (all fields optional; the body may be
/// empty). Who acts is the token's operator, never the request's say.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DlqActionBody {
    /// A note for the archive.
    note: Option<String>,
    /// For retry: the corrected payload to send instead of the original.
    payload: Option<Value>,
}

/// An action's JSON body (an empty one is `T::default()`); 415 unless the
/// request says it is JSON.
fn action_body<T: Default + serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<T> {
    require_json(headers)?;
    let body = body.map_err(body_error)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse_json(&body)
    }
}

fn dlq_result(r: Result<crate::dlq::ArchiveEntry, DlqError>) -> ApiResult<Json<Value>> {
    match r {
        Ok(entry) => Ok(Json(json!(entry))),
        Err(DlqError::NotFound(m)) => Err(ApiError::not_found(m)),
        Err(DlqError::Closed(m)) => Err(ApiError::new(StatusCode::CONFLICT, m)),
        Err(DlqError::Invalid(m)) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m)),
        Err(DlqError::Refused(m)) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{m}; nothing was done"),
        )),
        Err(DlqError::Unavailable(m)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{m}; nothing was done, please retry"),
        )),
    }
}

/// The filters of `GET /sagas`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SagasParams {
    /// running, compensating, completed, compensated, parked, active, final.
    status: Option<String>,
    /// The step the saga is at.
    step: Option<String>,
    /// Unchanged for longer than this (`5m`, `30s`, `2h`, `1d`).
    older_than: Option<String>,
    /// The page after this saga id.
    after: Option<String>,
    /// At most this many (default 100, at most 1,000).
    limit: Option<usize>,
}

fn saga_query(p: SagasParams) -> ApiResult<SagaQuery> {
    let bad = |field: &str, error: String| ApiError {
        status: StatusCode::BAD_REQUEST,
        error,
        field: Some(field.into()),
    };
    let mut q = SagaQuery::all().limit(p.limit.unwrap_or(100).clamp(1, 1_000));
    if let Some(s) = p.status {
        let status: StatusFilter = s.parse().map_err(|e| bad("status", e))?;
        q = q.status(status);
    }
    if let Some(step) = p.step {
        q = q.step(step);
    }
    if let Some(age) = p.older_than {
        let d = humantime::parse_duration(&age).map_err(|e| {
            bad(
                "older_than",
                format!("`{age}` is not a duration like 5m: {e}"),
            )
        })?;
        q = q.older_than(d);
    }
    if let Some(after) = p.after {
        q = q.after(saga_core::SagaId::new(after));
    }
    Ok(q)
}

/// One line of a saga listing: where it stands and since when.
fn saga_summary(i: &SagaInstance<Order>, now: Timestamp) -> Value {
    json!({
        "id": i.id,
        "saga": &*i.saga,
        "status": i.status.name(),
        "reason": match &i.status {
            saga_core::SagaStatus::Parked { reason } => Some(reason.clone()),
            _ => i.failure.clone(),
        },
        "step": (!i.status.is_final()).then(|| i.current_step()).flatten(),
        "created_at": i.created_at,
        "updated_at": i.updated_at,
        "age_ms": now.saturating_since(i.created_at).as_millis() as u64,
        "idle_ms": now.saturating_since(i.updated_at).as_millis() as u64,
    })
}

fn saga_error(e: SagaError) -> ApiError {
    match e {
        SagaError::UnknownSaga { saga_id, .. } => {
            ApiError::not_found(format!("no saga `{saga_id}`"))
        }
        e @ SagaError::InvalidAction { .. } => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        e if e.is_retryable() => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        e => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /sagas`: the order sagas the filters select, a page at a time
/// (operators).
async fn list_sagas(
    State(s): State<Arc<System>>,
    Operator(_): Operator,
    params: Result<axum::extract::Query<SagasParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    if !s.services.order {
        return Err(not_here("order"));
    }
    let params = params
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?
        .0;
    let page = s.sagas(&saga_query(params)?).await.map_err(saga_error)?;
    let now = Timestamp::now();
    Ok(Json(json!({
        "sagas": page.items.iter().map(|i| saga_summary(i, now)).collect::<Vec<_>>(),
        "next": page.next,
        "as_of": page.as_of,
    })))
}

/// `GET /sagas/{id}`: one order saga with its data, steps and history
/// (operators).
async fn get_saga(
    State(s): State<Arc<System>>,
    Operator(_): Operator,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    if !s.services.order {
        return Err(not_here("order"));
    }
    match s.order(&id).await.map_err(storage_error)? {
        Some(i) => {
            let trace_id = i.trace.map(|t| t.trace_id().to_string());
            let mut body = json!(i);
            body["trace_id"] = json!(trace_id);
            Ok(Json(body))
        }
        None => Err(ApiError::not_found(format!("no saga `{id}`"))),
    }
}

/// `GET /sagas/definition`: the order saga's steps (name, kind, the
/// channel of a remote step's command, whether it has a compensation) and
/// its diagram as Mermaid text (operators; the web page draws the steps).
async fn saga_definition(
    State(s): State<Arc<System>>,
    Operator(_): Operator,
) -> ApiResult<Json<Value>> {
    let def = part(&s.orders, "order")?.definition();
    let steps: Vec<Value> = def
        .steps()
        .iter()
        .map(|step| {
            json!({
                "name": step.name(),
                "kind": step.kind(),
                "channel": step.channel(),
                "compensation": step.has_compensation(),
                "compensation_channel": step.compensation_channel(),
            })
        })
        .collect();
    Ok(Json(json!({
        "saga": def.name(),
        "steps": steps,
        "mermaid": def.to_mermaid(),
    })))
}

/// The body of `POST /sagas/{id}/<action>`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SagaActionBody {
    /// Why (recorded in the saga's history).
    note: Option<String>,
    /// The step the operator saw the saga parked on: the action is refused
    /// if it is parked elsewhere by then.
    step: Option<String>,
    /// The saga's version the operator saw: the action is refused if the
    /// saga changed since (so a request sent twice acts once).
    version: Option<u64>,
}

/// The route of an operator's action on a parked or stuck saga: recorded in its
/// history with the token's operator and the note; 202 once the runtime
/// took it (on Kafka its owner applies it when it reads it).
fn saga_action(action: OperatorAction) -> MethodRouter<Arc<System>> {
    post(
        move |State(s): State<Arc<System>>,
              Operator(operator): Operator,
              Path(id): Path<String>,
              headers: HeaderMap,
              body: Result<Bytes, BytesRejection>| async move {
            let b: SagaActionBody = action_body(&headers, body)?;
            if !s.services.order {
                return Err(not_here("order"));
            }
            let mut op = Operation::new(action, operator.name).note(b.note.unwrap_or_default());
            if let Some(step) = b.step {
                op = op.on_step(step);
            }
            if let Some(version) = b.version {
                op = op.at_version(version);
            }
            s.operate(&id, op).await.map_err(saga_error)?;
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"saga": id, "action": action.as_str(), "accepted": true})),
            ))
        },
    )
}

/// An operator's action on a dead letter (`POST /dlq/{id}/<action>`).
#[derive(Clone, Copy, Debug)]
enum DlqAction {
    /// Send the original (or the corrected `payload`) again.
    Retry,
    /// Close it, with a `note`.
    Discard,
    /// Raise an alert, with a `note` (it stays open).
    Alert,
    /// Tell the customer by SMS.
    Sms,
}

/// The route of `action`: one handler for the four actions (each keeps
/// its own path, so other methods answer 405 and other actions 404).
fn dlq_action(action: DlqAction) -> MethodRouter<Arc<System>> {
    post(
        move |State(s): State<Arc<System>>,
              Operator(operator): Operator,
              Path(id): Path<String>,
              headers: HeaderMap,
              body: Result<Bytes, BytesRejection>| async move {
            let b: DlqActionBody = action_body(&headers, body)?;
            let who = operator.name;
            let dlq = part(&s.dlq, "dlq")?;
            let note = b.note.as_deref().unwrap_or("");
            dlq_result(match action {
                DlqAction::Retry => dlq.retry(&id, b.payload, &who, note).await,
                DlqAction::Discard => dlq.discard(&id, &who, note).await,
                DlqAction::Alert => dlq.alert(&id, &who, note).await,
                DlqAction::Sms => dlq.sms(&id, &who, note).await,
            })
        },
    )
}
