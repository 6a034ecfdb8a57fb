//! The e-commerce example through its HTTP API, in memory, under tokio's
//! paused clock (the notification backoffs take no real time): the seed's
//! three flows, the DLQ processor, idempotency, every bad request, and who
//! may call what (bearer tokens by role, JSON-only writes, catalogue
//! prices).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::Router;
use serde_json::{json, Value};

use ecommerce::auth::ApiTokens;
use ecommerce::notification::FakeOutcome;
use ecommerce::system::{Config, System};

/// The operator the tests act as, and its token.
const OPERATOR: &str = "alice";
const OPERATOR_TOKEN: &str = "operator-alice-token-0001";
/// Customers c-1 and c-2's tokens.
const C1_TOKEN: &str = "customer-c-1-token-0001";
const C2_TOKEN: &str = "customer-c-2-token-0001";

fn tokens() -> ApiTokens {
    ApiTokens::parse(&format!(
        "operator {OPERATOR} {OPERATOR_TOKEN}\n\
         customer c-1 {C1_TOKEN}\n\
         customer c-2 {C2_TOKEN}\n"
    ))
    .expect("the test tokens parse")
}

async fn start() -> (Arc<System>, Router) {
    let system = Arc::new(
        System::start(Config::default())
            .await
            .expect("the system starts"),
    );
    let api = ecommerce::http::router(system.clone(), tokens());
    (system, api)
}

/// Calls the API as the operator.
async fn call(api: &Router, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    ecommerce::demo::call(api, Some(OPERATOR_TOKEN), method, path, body).await
}

/// Sends a request with exactly `headers` and `body`; the status, the
/// headers and the JSON body (`Null` if not JSON).
async fn raw(
    api: &Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = axum::http::Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(axum::body::Body::from(body.to_owned())).unwrap();
    let res = tower::ServiceExt::oneshot(api.clone(), req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

fn seed_order() -> Value {
    json!({"customer_id": "c-42", "items": [
        {"sku": "LAPTOP-001", "quantity": 1, "unit_price": "999.99"},
        {"sku": "MOUSE-001", "quantity": 2, "unit_price": "29.99"}
    ]})
}

/// Posts `body`, expects 202, waits until everything settled; returns the id.
async fn place(system: &System, api: &Router, body: Value) -> String {
    let (status, created) = call(api, "POST", "/orders", Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(created["status"], "PENDING");
    let id = created["order_id"].as_str().unwrap().to_owned();
    assert!(
        system.wait_idle(Duration::from_secs(120)).await,
        "order {id} did not settle"
    );
    id
}

async fn get(api: &Router, path: &str) -> Value {
    let (status, body) = call(api, "GET", path, None).await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    body
}

#[tokio::test(start_paused = true)]
async fn flow_1_success_confirms_reserves_and_notifies() {
    let (system, api) = start().await;
    let (status, created) = call(&api, "POST", "/orders", Some(seed_order())).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(created["total"], "1059.97");
    assert_eq!(created["status"], "PENDING");
    let id = created["order_id"].as_str().unwrap().to_owned();
    assert!(system.wait_idle(Duration::from_secs(60)).await);

    let order = get(&api, &format!("/orders/{id}")).await;
    assert_eq!(order["status"], "CONFIRMED");
    assert_eq!(order["total"], "1059.97");
    assert_eq!(order["notification"]["status"], "SENT");
    let history: Vec<&str> = order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["PENDING", "CONFIRMED"]);
    assert!(order.get("reason").is_none());

    let laptop = get(&api, "/inventory/LAPTOP-001").await;
    assert_eq!(
        (laptop["reserved"].as_u64(), laptop["available"].as_u64()),
        (Some(1), Some(49))
    );
    let mouse = get(&api, "/inventory/MOUSE-001").await;
    assert_eq!(
        (mouse["reserved"].as_u64(), mouse["available"].as_u64()),
        (Some(2), Some(198))
    );

    let a = get(&api, "/analytics").await;
    assert_eq!(a["orders.created"], 1);
    assert_eq!(a["orders.confirmed"], 1);
    assert_eq!(a["orders.cancelled"], 0);
    assert_eq!(a["revenue.confirmed"], "1059.97");
    assert_eq!(a["notifications.sent"], 1);
    assert_eq!(a["inventory.reservations"], 1);

    // Every channel of the seed carried this order's messages.
    for ch in [
        ecommerce::messages::ORDERS_EVENTS,
        ecommerce::messages::INVENTORY_REQUESTS,
        ecommerce::messages::INVENTORY_RESPONSES,
        ecommerce::messages::INVENTORY_EVENTS,
        ecommerce::messages::NOTIFICATIONS_REQUESTS,
        ecommerce::messages::NOTIFICATIONS_EVENTS,
    ] {
        assert!(
            system.read(ch).iter().any(|e| e.saga_id.as_str() == id),
            "nothing for {id} on {ch}"
        );
    }
    let types: Vec<String> = system
        .read(ecommerce::messages::ORDERS_EVENTS)
        .iter()
        .map(|e| ecommerce::messages::message_type(&e.payload))
        .collect();
    assert_eq!(types, ["ORDER_CREATED", "ORDER_CONFIRMED"]);
    let timeline = get(&api, &format!("/orders/{id}/timeline")).await;
    assert!(timeline["timeline"].as_array().unwrap().len() >= 10);
}

#[tokio::test(start_paused = true)]
async fn flow_2_insufficient_stock_cancels_with_the_numbers_and_changes_nothing() {
    let (system, api) = start().await;
    let id = place(
        &system,
        &api,
        json!({"customer_id": "c-7", "items": [
            {"sku": "MOUSE-001", "quantity": 1, "unit_price": "29.99"},
            {"sku": "LAPTOP-001", "quantity": 100, "unit_price": "999.99"}
        ]}),
    )
    .await;
    let order = get(&api, &format!("/orders/{id}")).await;
    assert_eq!(order["status"], "CANCELLED");
    assert_eq!(
        order["reason"],
        "Not enough stock: LAPTOP-001 available 50, requested 100"
    );
    assert_eq!(order["saga_status"], "compensated");
    // The customer is told.
    assert_eq!(order["notification"], Value::Null);
    let sent = system.email.sent();
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0].body.contains("Not enough stock"),
        "{}",
        sent[0].body
    );

    // All or nothing: not even the mouse was reserved.
    for sku in ["LAPTOP-001", "MOUSE-001"] {
        assert_eq!(get(&api, &format!("/inventory/{sku}")).await["reserved"], 0);
    }
    let reply = system
        .read(ecommerce::messages::INVENTORY_RESPONSES)
        .into_iter()
        .find(|e| e.saga_id.as_str() == id)
        .unwrap();
    assert_eq!(reply.payload["status"], "INSUFFICIENT_STOCK");
    assert_eq!(reply.payload["available"], 50);
    assert_eq!(reply.payload["requested"], 100);

    let a = get(&api, "/analytics").await;
    assert_eq!(a["orders.created"], 1);
    assert_eq!(a["orders.cancelled"], 1);
    assert_eq!(a["orders.confirmed"], 0);
    assert_eq!(a["revenue.lost"], "100028.99");
    assert_eq!(a["cancellation_reasons"]["stock"], 1);
    assert_eq!(a["notifications.sent"], 1);
    assert_eq!(a["inventory.reservations"], 0);
}

#[tokio::test(start_paused = true)]
async fn flow_3_failing_email_goes_to_the_dlq_after_3_attempts_and_the_order_stays_confirmed() {
    let (system, api) = start().await;
    system.email.script([
        FakeOutcome::Timeout,
        FakeOutcome::Status(503),
        FakeOutcome::Status(500),
    ]);
    let id = place(&system, &api, seed_order()).await;
    let order = get(&api, &format!("/orders/{id}")).await;
    assert_eq!(order["status"], "CONFIRMED");
    assert_eq!(order["saga_status"], "completed");
    assert_eq!(order["notification"]["status"], "FAILED");
    assert_eq!(order["notification"]["attempts"], 3);

    // Three attempts: a timeout (5 s), then 503 two seconds later, then
    // 500 four seconds after that.
    let attempts = system.notifications.as_ref().unwrap().attempts_for(&id);
    let outcomes: Vec<&str> = attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        [
            "no answer (timed out)",
            "503 Service Unavailable",
            "500 Internal Server Error"
        ]
    );
    let gap = |i: usize| {
        attempts[i]
            .started_at
            .saturating_since(attempts[i - 1].ended_at)
    };
    assert!(gap(1) >= Duration::from_secs(2) && gap(2) >= Duration::from_secs(4));

    let dlq = get(&api, "/dlq").await;
    assert_eq!(dlq["open"], 1);
    let entry = &dlq["entries"][0];
    assert_eq!(entry["dlq_id"], "dlq-1");
    assert_eq!(entry["order_id"], id.as_str());
    assert_eq!(entry["status"], "open");
    let dead = &entry["dead_letter"];
    assert_eq!(dead["channel"], "notifications.dlq");
    assert_eq!(dead["retry_count"], 3);
    assert_eq!(dead["reason"], "max retries reached (3 attempts)");
    assert_eq!(dead["last_error"], "500 Internal Server Error");
    assert!(dead["failure_timestamp"].is_u64());
    assert_eq!(dead["original"]["channel"], "notifications.requests");
    assert_eq!(dead["original"]["payload"]["type"], "ORDER_CONFIRMED");

    let a = get(&api, "/analytics").await;
    assert_eq!(a["orders.confirmed"], 1);
    assert_eq!(a["revenue.confirmed"], "1059.97");
    assert_eq!(a["notifications.sent"], 0);
    assert_eq!(a["notifications.failed"], 1);
}

#[tokio::test(start_paused = true)]
async fn the_dlq_processor_retries_corrected_alerts_discards_and_archives() {
    let (system, api) = start().await;
    // Two orders whose emails fail permanently (400: not retried).
    system
        .email
        .script([FakeOutcome::Status(400), FakeOutcome::Status(400)]);
    let first = place(&system, &api, seed_order()).await;
    let second = place(&system, &api, seed_order()).await;
    assert_eq!(get(&api, "/dlq").await["open"], 2);
    let retry_count = &get(&api, "/dlq/dlq-1").await["dead_letter"]["retry_count"];
    assert_eq!(retry_count, 1, "a permanent error is not retried");

    // Alert: archived, the message stays open.
    let (status, alert) = call(
        &api,
        "POST",
        "/dlq/dlq-1/alert",
        Some(json!({"note": "email API rejects us"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{alert}");
    assert_eq!(get(&api, "/dlq/dlq-1").await["status"], "alerted");

    // Retry with a corrected payload: sent again under a new id, delivered.
    let mut corrected = get(&api, "/dlq/dlq-1").await["dead_letter"]["original"]["payload"].clone();
    corrected["email"] = json!("c-42@corrected.example.com");
    let (status, retried) = call(
        &api,
        "POST",
        "/dlq/dlq-1/retry",
        Some(json!({"payload": corrected, "note": "TICKET-1: address fixed"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{retried}");
    // The archive says what was done, and the operator's note.
    assert_eq!(
        retried["note"],
        "sent again to `notifications.requests` with a corrected payload; TICKET-1: address fixed",
        "{retried}"
    );
    assert!(retried["new_message_id"]
        .as_str()
        .unwrap()
        .ends_with("/dlq-retry"));
    assert!(system.wait_idle(Duration::from_secs(60)).await);
    assert!(system
        .email
        .sent()
        .iter()
        .any(|e| e.to == "c-42@corrected.example.com"));
    assert_eq!(get(&api, "/dlq/dlq-1").await["status"], "retried");
    // A closed dead letter is not handled twice.
    let (status, again) = call(&api, "POST", "/dlq/dlq-1/retry", None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(again["error"].as_str().unwrap().contains("already handled"));

    // Discard the other.
    let (status, _) = call(&api, "POST", "/dlq/dlq-2/discard", None).await;
    assert_eq!(status, StatusCode::OK);

    let archive = get(&api, "/dlq/archive").await;
    let done: Vec<(String, String, String)> = archive["archive"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["dlq_id"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
                e["by"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("dlq-1", "alert", "alice"),
        ("dlq-1", "retry", "alice"),
        ("dlq-2", "discard", "alice"),
    ]
    .iter()
    .map(|(a, b, c)| ((*a).into(), (*b).into(), (*c).into()))
    .collect();
    assert_eq!(done, expected);
    assert!(archive["archive"][0]["at"].as_str().unwrap().ends_with("Z"));
    assert_eq!(get(&api, "/dlq").await["open"], 0);

    // Both orders stayed CONFIRMED throughout.
    for id in [first, second] {
        assert_eq!(
            get(&api, &format!("/orders/{id}")).await["status"],
            "CONFIRMED"
        );
    }
    let (status, _) = call(&api, "POST", "/dlq/dlq-9/discard", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(start_paused = true)]
async fn the_sms_fallback_tells_the_customer_and_counts_as_sent() {
    let (system, api) = start().await;
    system.email.script([FakeOutcome::Status(400)]);
    let id = place(&system, &api, seed_order()).await;
    let note = json!({"note": "  TICKET-2  "});
    let (status, done) = call(&api, "POST", "/dlq/dlq-1/sms", Some(note)).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["action"], "sms");
    let archived = done["note"].as_str().unwrap();
    assert!(
        archived.starts_with("SMS to ") && archived.ends_with("; TICKET-2"),
        "{done}"
    );
    let sms = system.dlq().sms_gateway().sent();
    assert_eq!(sms.len(), 1);
    assert!(sms[0].text.contains(&id));
    assert!(system.wait_idle(Duration::from_secs(10)).await);
    let a = get(&api, "/analytics").await;
    assert_eq!(
        (
            a["notifications.failed"].as_u64(),
            a["notifications.sent"].as_u64()
        ),
        (Some(1), Some(1))
    );
}

#[tokio::test(start_paused = true)]
async fn a_reservation_request_seen_twice_reserves_once() {
    let (system, api) = start().await;
    let id = place(&system, &api, seed_order()).await;
    let original = system
        .read(ecommerce::messages::INVENTORY_REQUESTS)
        .into_iter()
        .find(|e| e.saga_id.as_str() == id)
        .unwrap();
    // Redelivered with the same id (the runtime's ledger answers it again)
    // and re-sent under a new id (the inventory's per-order guard).
    let mut renamed = original.clone();
    renamed.id = saga_core::MessageId::new(format!("{}/resent", original.id));
    system.publish(original).await.unwrap();
    system.publish(renamed).await.unwrap();
    assert!(system.wait_idle(Duration::from_secs(10)).await);
    let laptop = get(&api, "/inventory/LAPTOP-001").await;
    assert_eq!(laptop["reserved"], 1);
    let replies = system
        .read(ecommerce::messages::INVENTORY_RESPONSES)
        .into_iter()
        .filter(|e| e.saga_id.as_str() == id)
        .count();
    assert_eq!(replies, 3, "each delivery is answered");
    let reserved_events = system
        .read(ecommerce::messages::INVENTORY_EVENTS)
        .into_iter()
        .filter(|e| e.saga_id.as_str() == id)
        .count();
    assert_eq!(reserved_events, 1);
    assert_eq!(get(&api, "/analytics").await["orders.confirmed"], 1);
    assert_eq!(
        get(&api, &format!("/orders/{id}")).await["status"],
        "CONFIRMED"
    );
}

/// `POST /orders` with an `Idempotency-Key` header.
async fn post_keyed(api: &Router, key: &str, body: &Value) -> (StatusCode, Value) {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;
    let req = Request::builder()
        .method("POST")
        .uri("/orders")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {OPERATOR_TOKEN}"))
        .header("idempotency-key", key)
        .body(Body::from(body.to_string()))
        .unwrap();
    let res = api.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(start_paused = true)]
async fn retries_with_the_same_idempotency_key_place_one_order() {
    let (system, api) = start().await;
    let (status, first) = post_keyed(&api, "cart-1", &seed_order()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let id = first["order_id"].as_str().unwrap().to_owned();
    assert_eq!(id, ecommerce::system::order_id_for_key("c-42", "cart-1"));
    assert!(system.wait_idle(Duration::from_secs(60)).await);
    // The retry gets the same order, as it is now.
    let (status, again) = post_keyed(&api, "cart-1", &seed_order()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(
        (&again["order_id"], &again["status"]),
        (&json!(id), &json!("CONFIRMED"))
    );
    assert!(system.wait_idle(Duration::from_secs(60)).await);
    assert_eq!(
        get(&api, "/orders").await["orders"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(get(&api, "/inventory/LAPTOP-001").await["reserved"], 1);
    // The same key from another customer is another order.
    let mut other = seed_order();
    other["customer_id"] = json!("c-43");
    let (_, theirs) = post_keyed(&api, "cart-1", &other).await;
    assert_ne!(theirs["order_id"], json!(id));
    // The same key with other items is refused.
    let mut changed = seed_order();
    changed["items"][0]["quantity"] = json!(3);
    let (status, refused) = post_keyed(&api, "cart-1", &changed).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert_eq!(refused["field"], "Idempotency-Key");
    // A key that is not 1–200 visible ASCII characters is refused.
    for bad in ["", "has space", &"k".repeat(201)] {
        let (status, body) = post_keyed(&api, bad, &seed_order()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}: {body}");
    }
}

#[test]
fn analytics_counts_an_event_once() {
    let a = ecommerce::analytics::Analytics::new();
    let env = saga_core::Envelope::event(
        saga_core::MessageId::new("o-1/event/2"),
        ecommerce::messages::ORDERS_EVENTS,
        saga_core::SagaId::new("o-1"),
        "order",
        serde_json::to_value(ecommerce::messages::OrderEvent::OrderConfirmed {
            order_id: "o-1".into(),
            total: "10.50".parse().unwrap(),
        })
        .unwrap(),
        saga_core::Timestamp::EPOCH,
    );
    a.apply(&env);
    a.apply(&env);
    let s = a.summary();
    assert_eq!(s.orders_confirmed, 1);
    assert_eq!(s.revenue_confirmed.to_string(), "10.50");
}

#[tokio::test(start_paused = true)]
async fn health_metrics_and_lookups() {
    let (system, api) = start().await;
    let _ = place(&system, &api, seed_order()).await;
    assert_eq!(get(&api, "/health").await["status"], "ok");
    let (status, text) = call(&api, "GET", "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().unwrap().to_owned();
    for name in [
        "ecommerce_dlq_open",
        "ecommerce_consumer_lag",
        "saga_started_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert_eq!(
        get(&api, "/orders").await["orders"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (status, body) = call(&api, "GET", "/orders/ORD-NOPE", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "no order `ORD-NOPE`");
    let (status, body) = call(&api, "GET", "/inventory/NOPE-1", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "unknown SKU `NOPE-1`");
    assert_eq!(
        get(&api, "/inventory").await["stock"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

// ---- Bad requests: one test per case, status and message. ----

/// Posts raw `body` to /orders; returns the status and the error message.
async fn reject(body: &str) -> (StatusCode, String, Value) {
    let (system, api) = start().await;
    let req = axum::http::Request::builder()
        .method("POST")
        .uri("/orders")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {OPERATOR_TOKEN}"))
        .body(axum::body::Body::from(body.to_owned()))
        .unwrap();
    let res = tower::ServiceExt::oneshot(api, req).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&bytes).expect("errors are JSON");
    // Nothing was started.
    assert!(system.orders().await.unwrap().is_empty());
    (
        status,
        v["error"].as_str().unwrap_or_default().to_owned(),
        v,
    )
}

fn with_item(item: Value) -> String {
    json!({"customer_id": "c-42", "items": [item]}).to_string()
}

#[tokio::test]
async fn bad_json_is_400() {
    let (status, error, _) = reject(r#"{"customer_id": "c-42", "items": [}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error.starts_with("invalid JSON:"), "{error}");
}

#[tokio::test]
async fn a_missing_field_is_400() {
    let (status, error, _) = reject(r#"{"customer_id": "c-42"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error.contains("missing field `items`"), "{error}");
}

#[tokio::test]
async fn no_items_is_422() {
    let (status, error, v) = reject(r#"{"customer_id": "c-42", "items": []}"#).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error, "items: an order needs at least one item");
    assert_eq!(v["field"], "items");
}

#[tokio::test]
async fn zero_quantity_is_422() {
    let body = with_item(json!({"sku": "LAPTOP-001", "quantity": 0, "unit_price": "999.99"}));
    let (status, error, v) = reject(&body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error, "items[0].quantity: must be at least 1, got 0");
    assert_eq!(v["field"], "items[0].quantity");
}

#[tokio::test]
async fn negative_quantity_is_422() {
    let body = with_item(json!({"sku": "LAPTOP-001", "quantity": -3, "unit_price": "999.99"}));
    let (status, error, _) = reject(&body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error, "items[0].quantity: must be at least 1, got -3");
}

#[tokio::test]
async fn unknown_sku_is_422() {
    let body = with_item(json!({"sku": "NOPE-1", "quantity": 1, "unit_price": "1.00"}));
    let (status, error, _) = reject(&body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error, "items[0].sku: unknown SKU `NOPE-1`");
}

#[tokio::test]
async fn malformed_price_is_422() {
    let body = with_item(json!({"sku": "LAPTOP-001", "quantity": 1, "unit_price": "12,50"}));
    let (status, error, _) = reject(&body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        error.starts_with("items[0].unit_price: malformed price: `12,50` is not a decimal number"),
        "{error}"
    );
}

#[tokio::test]
async fn a_price_with_fractions_of_a_cent_is_422() {
    let body = with_item(json!({"sku": "LAPTOP-001", "quantity": 1, "unit_price": "9.999"}));
    let (status, error, _) = reject(&body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        error,
        "items[0].unit_price: malformed price: `9.999` has more than 2 decimal places"
    );
}

#[tokio::test]
async fn a_negative_price_is_422() {
    let body = with_item(json!({"sku": "LAPTOP-001", "quantity": 1, "unit_price": "-5.00"}));
    let (status, error, _) = reject(&body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        error,
        "items[0].unit_price: malformed price: must be greater than 0, got -5.00"
    );
}

#[tokio::test]
async fn a_body_too_large_is_413() {
    let padding = "x".repeat(ecommerce::http::MAX_BODY_BYTES);
    let body = json!({"customer_id": padding, "items": []}).to_string();
    let (status, error, _) = reject(&body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error, "request body too large: at most 16384 bytes");
}

#[tokio::test]
async fn errors_the_router_answers_itself_are_json_too() {
    let (_system, api) = start().await;
    let auth = format!("Bearer {OPERATOR_TOKEN}");
    let headers = [("authorization", auth.as_str())];
    // A path parameter that is not UTF-8, a method a route does not take.
    for (method, path, want) in [
        ("GET", "/orders/%FF", StatusCode::BAD_REQUEST),
        ("GET", "/dlq/dlq-1/retry", StatusCode::METHOD_NOT_ALLOWED),
        ("DELETE", "/orders", StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let (status, h, body) = raw(&api, method, path, &headers, "").await;
        assert_eq!(status, want, "{method} {path}: {body}");
        assert_eq!(h["content-type"], "application/json", "{method} {path}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(!error.is_empty(), "{method} {path}: {body}");
        if want == StatusCode::METHOD_NOT_ALLOWED {
            assert!(h.contains_key("allow"), "{method} {path}: {h:?}");
        }
    }
}

#[tokio::test]
async fn a_runtime_that_cannot_take_the_write_is_503_and_retryable() {
    let (system, api) = start().await;
    system.set_accepting(false);
    let req = axum::http::Request::builder()
        .method("POST")
        .uri("/orders")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {OPERATOR_TOKEN}"))
        .body(axum::body::Body::from(seed_order().to_string()))
        .unwrap();
    let res = tower::ServiceExt::oneshot(api.clone(), req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["retryable"], true);
    assert!(v["error"].as_str().unwrap().contains("please retry"), "{v}");
    assert!(system.orders().await.unwrap().is_empty());

    // Once it takes writes again, the same request goes through.
    system.set_accepting(true);
    let (status, _) = call(&api, "POST", "/orders", Some(seed_order())).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

// ---- Who may call what. ----

/// An order of `customer` for one mouse, at the catalogue's price.
fn mouse_for(customer: &str) -> Value {
    json!({"customer_id": customer, "items": [{"sku": "MOUSE-001", "quantity": 1}]})
}

#[tokio::test(start_paused = true)]
async fn no_token_or_an_unknown_one_is_401_with_www_authenticate_on_orders_and_the_dlq() {
    let (system, api) = start().await;
    let json_type = ("content-type", "application/json");
    let body = mouse_for("c-1").to_string();
    let unknown = bearer("not-a-configured-token-01");
    let garbled = ("authorization", "Basic YWxpY2U6c2VjcmV0".to_owned());
    for (method, path) in [
        ("POST", "/orders"),
        ("GET", "/orders"),
        ("GET", "/orders/ORD-1"),
        ("GET", "/dlq"),
        ("GET", "/dlq/archive"),
        ("GET", "/dlq/dlq-1"),
        ("POST", "/dlq/dlq-1/retry"),
        ("GET", "/analytics"),
        ("GET", "/inventory"),
    ] {
        for auth in [None, Some(&unknown), Some(&garbled)] {
            let mut headers = vec![json_type];
            if let Some((k, v)) = auth {
                headers.push((*k, v.as_str()));
            }
            let (status, h, v) = raw(&api, method, path, &headers, &body).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {auth:?}: {v}"
            );
            assert!(
                h["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Bearer"),
                "{method} {path}"
            );
            assert!(v["error"].is_string(), "{v}");
        }
    }
    assert!(system.orders().await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_customer_token_is_403_on_the_dlq_and_analytics() {
    let (system, api) = start().await;
    system.email.script([FakeOutcome::Status(400)]);
    let _ = place(&system, &api, seed_order()).await;
    let customer = bearer(C1_TOKEN);
    let auth = (customer.0, customer.1.as_str());
    for (method, path) in [
        ("GET", "/dlq"),
        ("GET", "/dlq/archive"),
        ("GET", "/dlq/dlq-1"),
        ("POST", "/dlq/dlq-1/retry"),
        ("POST", "/dlq/dlq-1/discard"),
        ("POST", "/dlq/dlq-1/sms"),
        ("GET", "/analytics"),
    ] {
        let headers = [auth, ("content-type", "application/json")];
        let (status, _, v) = raw(&api, method, path, &headers, "").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {v}");
        assert_eq!(v["error"], "this endpoint is for operators");
    }
    // Nothing was done to the dead letter.
    assert!(system.dlq().sms_gateway().sent().is_empty());
    assert_eq!(call(&api, "GET", "/dlq", None).await.1["open"], 1);
}

#[tokio::test(start_paused = true)]
async fn a_customer_cannot_place_an_order_for_another_nor_see_one() {
    let (system, api) = start().await;
    let as_c1 = |method: &'static str, path: String, body: Option<Value>| {
        let api = api.clone();
        async move { ecommerce::demo::call(&api, Some(C1_TOKEN), method, &path, body).await }
    };
    // c-1 orders for itself: accepted.
    let (status, mine) = as_c1("POST", "/orders".into(), Some(mouse_for("c-1"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{mine}");
    let mine = mine["order_id"].as_str().unwrap().to_owned();
    // c-1 orders for c-2: refused, nothing placed.
    let (status, refused) = as_c1("POST", "/orders".into(), Some(mouse_for("c-2"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert_eq!(refused["field"], "customer_id");
    assert_eq!(system.orders().await.unwrap().len(), 1);
    // c-2's own order: c-1 gets 404, as for an order that does not exist.
    let (status, theirs) = ecommerce::demo::call(
        &api,
        Some(C2_TOKEN),
        "POST",
        "/orders",
        Some(mouse_for("c-2")),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{theirs}");
    let theirs = theirs["order_id"].as_str().unwrap().to_owned();
    assert!(system.wait_idle(Duration::from_secs(60)).await);
    for path in [
        format!("/orders/{theirs}"),
        format!("/orders/{theirs}/timeline"),
    ] {
        let (status, body) = as_c1("GET", path.clone(), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(body["error"], format!("no order `{theirs}`"));
    }
    // c-1 sees its own order, and lists only its own; the operator all.
    let (status, own) = as_c1("GET", format!("/orders/{mine}"), None).await;
    assert_eq!(
        (status, &own["customer_id"]),
        (StatusCode::OK, &json!("c-1"))
    );
    let (status, _) = as_c1("GET", format!("/orders/{mine}/timeline"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, listed) = as_c1("GET", "/orders".into(), None).await;
    let ids: Vec<&str> = listed["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [mine.as_str()]);
    assert_eq!(
        get(&api, "/orders").await["orders"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test(start_paused = true)]
async fn a_write_without_a_json_content_type_is_415_and_does_nothing() {
    let (system, api) = start().await;
    system.email.script([FakeOutcome::Status(400)]);
    let _ = place(&system, &api, seed_order()).await;
    let operator = bearer(OPERATOR_TOKEN);
    let auth = (operator.0, operator.1.as_str());
    let body = seed_order().to_string();
    for (path, content_type) in [
        ("/orders", None),
        ("/orders", Some("text/plain")),
        ("/orders", Some("application/x-www-form-urlencoded")),
        ("/orders", Some("multipart/form-data; boundary=x")),
        ("/dlq/dlq-1/discard", None),
        ("/dlq/dlq-1/sms", Some("text/plain")),
    ] {
        let mut headers = vec![auth];
        if let Some(t) = content_type {
            headers.push(("content-type", t));
        }
        let (status, _, v) = raw(&api, "POST", path, &headers, &body).await;
        assert_eq!(
            status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{path} {content_type:?}: {v}"
        );
        assert_eq!(v["error"], "Content-Type must be application/json");
    }
    assert_eq!(system.orders().await.unwrap().len(), 1);
    assert_eq!(call(&api, "GET", "/dlq", None).await.1["open"], 1);
    // With parameters, it is JSON still.
    let headers = [auth, ("content-type", "application/json; charset=utf-8")];
    let (status, _, v) = raw(&api, "POST", "/orders", &headers, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
}

#[tokio::test(start_paused = true)]
async fn a_unit_price_other_than_the_catalogues_is_422_and_nothing_is_placed() {
    let (system, api) = start().await;
    let cheap = json!({"customer_id": "c-1", "items": [
        {"sku": "MOUSE-001", "quantity": 1, "unit_price": "29.99"},
        {"sku": "LAPTOP-001", "quantity": 1, "unit_price": "0.01"}
    ]});
    let (status, refused) = call(&api, "POST", "/orders", Some(cheap)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert_eq!(refused["field"], "items[1].unit_price");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .starts_with("items[1].unit_price: LAPTOP-001 costs 999.99, not 0.01"),
        "{refused}"
    );
    assert!(system.orders().await.unwrap().is_empty());
    assert_eq!(get(&api, "/inventory/LAPTOP-001").await["reserved"], 0);
    // Without a price, the line costs the catalogue's.
    let (status, created) = call(
        &api,
        "POST",
        "/orders",
        Some(json!({"customer_id": "c-1", "items": [{"sku": "LAPTOP-001", "quantity": 2}]})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(created["total"], "1999.98");
    // The catalogue says what things cost.
    let catalogue = get(&api, "/catalogue").await;
    assert!(
        catalogue["items"]
            .as_array()
            .unwrap()
            .contains(&json!({"sku": "LAPTOP-001", "unit_price": "999.99"})),
        "{catalogue}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_dlq_archive_records_the_tokens_operator_whatever_x_operator_says() {
    let (system, api) = start().await;
    system
        .email
        .script([FakeOutcome::Status(400), FakeOutcome::Status(400)]);
    let _ = place(&system, &api, seed_order()).await;
    let _ = place(&system, &api, seed_order()).await;
    let operator = bearer(OPERATOR_TOKEN);
    let headers = [
        (operator.0, operator.1.as_str()),
        ("content-type", "application/json"),
        ("x-operator", "mallory"),
    ];
    let (status, _, done) = raw(&api, "POST", "/dlq/dlq-1/discard", &headers, "").await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["by"], OPERATOR);
    // Nor can the body say who acts.
    let body = json!({"operator": "mallory", "note": "n"}).to_string();
    let (status, _, refused) = raw(&api, "POST", "/dlq/dlq-2/discard", &headers, &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `operator`"),
        "{refused}"
    );
    let archive = get(&api, "/dlq/archive").await;
    let by: Vec<&str> = archive["archive"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["by"].as_str().unwrap())
        .collect();
    assert_eq!(by, [OPERATOR]);
}

#[tokio::test(start_paused = true)]
async fn health_and_metrics_answer_without_a_token() {
    let (_system, api) = start().await;
    let (status, health) = ecommerce::demo::call(&api, None, "GET", "/health", None).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "ok");
    let (status, metrics) = ecommerce::demo::call(&api, None, "GET", "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(metrics.as_str().unwrap().contains("ecommerce_dlq_open"));
}

#[tokio::test(start_paused = true)]
async fn an_operator_finds_a_parked_order_and_retries_it_once_the_fault_is_fixed() {
    let (system, api) = start().await;
    let inventory = system.inventory.as_ref().unwrap();
    inventory.set_down(Some("the warehouse system is down"));
    let (status, created) = call(&api, "POST", "/orders", Some(seed_order())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["order_id"].as_str().unwrap().to_owned();
    assert!(system.wait_idle(Duration::from_secs(120)).await);

    // The reservation's outcome is unknown after its retries: parked.
    let parked = get(&api, "/sagas?status=parked").await;
    let sagas = parked["sagas"].as_array().unwrap();
    assert_eq!(sagas.len(), 1, "{parked}");
    assert_eq!(sagas[0]["id"], id.as_str());
    assert_eq!(sagas[0]["step"], "reserve-inventory");
    assert!(
        sagas[0]["reason"]
            .as_str()
            .unwrap()
            .contains("warehouse system is down"),
        "{parked}"
    );
    assert!(parked["as_of"].is_null(), "in memory the listing is exact");
    let later = get(&api, "/sagas?status=parked&older_than=1h").await;
    assert!(later["sagas"].as_array().unwrap().is_empty(), "{later}");
    let (status, _) = call(&api, "GET", "/sagas?status=stuck", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = ecommerce::demo::call(&api, Some(C1_TOKEN), "GET", "/sagas", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "operators only");

    // A retry is refused for another step than the one it is parked on.
    let (status, body) = call(
        &api,
        "POST",
        &format!("/sagas/{id}/retry"),
        Some(json!({"step": "confirm-order"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // ... and for a version of the saga other than the one it is at (the
    // page sends the version it shows, so a second press acts once).
    let (status, body) = call(
        &api,
        "POST",
        &format!("/sagas/{id}/retry"),
        Some(json!({"step": "reserve-inventory", "version": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.to_string().contains("it changed since"), "{body}");

    // The fault is fixed; the operator retries.
    inventory.set_down(None);
    let (status, body) = call(
        &api,
        "POST",
        &format!("/sagas/{id}/retry"),
        Some(json!({"step": "reserve-inventory", "note": "the warehouse is back"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert!(system.wait_idle(Duration::from_secs(120)).await);
    let order = get(&api, &format!("/orders/{id}")).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    let saga = get(&api, &format!("/sagas/{id}")).await;
    let retry = saga["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["what"].as_str().unwrap().contains("operator: retry"))
        .unwrap_or_else(|| panic!("{saga}"));
    assert_eq!(retry["operator"], OPERATOR);
    assert_eq!(retry["note"], "the warehouse is back");
    assert!(get(&api, "/sagas?status=parked").await["sagas"]
        .as_array()
        .unwrap()
        .is_empty());
    let (status, _) = call(&api, "POST", &format!("/sagas/{id}/abort"), None).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a completed saga is not parked"
    );
    let (status, _) = call(&api, "POST", "/sagas/nope/retry", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(start_paused = true)]
async fn an_operator_aborts_a_parked_order_and_it_is_cancelled_with_the_note() {
    let (system, api) = start().await;
    system
        .inventory
        .as_ref()
        .unwrap()
        .set_down(Some("the warehouse system is down"));
    let (_, created) = call(&api, "POST", "/orders", Some(seed_order())).await;
    let id = created["order_id"].as_str().unwrap().to_owned();
    assert!(system.wait_idle(Duration::from_secs(120)).await);
    let (status, body) = call(
        &api,
        "POST",
        &format!("/sagas/{id}/abort"),
        Some(json!({"note": "customer called to cancel"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert!(system.wait_idle(Duration::from_secs(120)).await);
    let order = get(&api, &format!("/orders/{id}")).await;
    assert_eq!(order["status"], "CANCELLED", "{order}");
    assert!(
        order["reason"]
            .as_str()
            .unwrap()
            .contains("customer called to cancel"),
        "{order}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_operators_page_loads_without_a_token_under_a_strict_policy() {
    let (_system, api) = start().await;
    let (status, headers, _) = raw(&api, "GET", "/ui", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    for directive in [
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(!csp.contains("unsafe"), "nothing inline: {csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    for (path, kind) in [
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let (status, headers, _) = raw(&api, "GET", path, &[], "").await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(
            headers["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
    }
    // The page needs no token; what it calls does.
    let (status, _, _) = raw(&api, "GET", "/sagas", &[], "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[test]
fn the_operators_page_loads_nothing_from_elsewhere_and_nothing_inline() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/ui");
    let html = std::fs::read_to_string(format!("{dir}/index.html")).unwrap();
    assert!(!html.contains("<style"), "no inline style element");
    assert!(!html.contains("style="), "no inline style attribute");
    let handler = html.match_indices(" on").any(|(i, _)| {
        let rest = &html[i + 3..];
        let name = rest.len()
            - rest
                .trim_start_matches(|c: char| c.is_ascii_lowercase())
                .len();
        name > 0 && rest[name..].starts_with('=')
    });
    assert!(!handler, "no inline event handler (onclick=…)");
    assert_eq!(
        html.matches("<script").count(),
        html.matches("<script src=\"/ui/").count(),
        "scripts come from /ui/ only"
    );
    for file in ["index.html", "app.js", "app.css"] {
        let text = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        assert!(
            !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
            "{file} refers to another site"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_saga_definition_gives_operators_the_steps_and_the_mermaid_text() {
    let (_system, api) = start().await;
    let def = get(&api, "/sagas/definition").await;
    assert_eq!(def["saga"], "order");
    let steps: Vec<(&str, &str)> = def["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("create-order", "compensatable"),
            ("reserve-inventory", "pivot"),
            ("confirm-order", "retryable"),
            ("notify-confirmation", "retryable"),
        ]
    );
    assert_eq!(def["steps"][1]["channel"], "inventory.requests");
    assert!(def["steps"][0]["channel"].is_null(), "a local step");
    assert_eq!(def["steps"][0]["compensation"], true);
    assert!(def["mermaid"]
        .as_str()
        .unwrap()
        .starts_with("stateDiagram-v2"));
    let (status, _) =
        ecommerce::demo::call(&api, Some(C1_TOKEN), "GET", "/sagas/definition", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "operators only");
}

#[tokio::test(start_paused = true)]
async fn an_order_continues_the_callers_traceparent_and_the_admin_view_shows_its_trace_id() {
    let (system, api) = start().await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let auth = bearer(OPERATOR_TOKEN);
    let body = seed_order().to_string();
    let (status, headers, created) = raw(
        &api,
        "POST",
        "/orders",
        &[
            (auth.0, &auth.1),
            ("content-type", "application/json"),
            ("traceparent", parent),
        ],
        &body,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let answered = headers["traceparent"].to_str().unwrap();
    let answered = saga_core::TraceContext::parse(answered).unwrap();
    assert_eq!(
        answered.trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    // The API's own span: a child of the caller's.
    assert_ne!(answered.span_id().to_string(), "00f067aa0ba902b7");
    let id = created["order_id"].as_str().unwrap().to_owned();
    assert!(system.wait_idle(Duration::from_secs(60)).await);
    let saga = get(&api, &format!("/sagas/{id}")).await;
    assert_eq!(
        saga["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{saga}"
    );

    // A malformed header is ignored: the order is placed in a new trace.
    let (status, headers, created) = raw(
        &api,
        "POST",
        "/orders",
        &[
            (auth.0, &auth.1),
            ("content-type", "application/json"),
            ("traceparent", "00-not-a-trace"),
        ],
        &body,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let fresh = saga_core::TraceContext::parse(headers["traceparent"].to_str().unwrap()).unwrap();
    assert_ne!(fresh.trace_id(), answered.trace_id());
    assert!(system.wait_idle(Duration::from_secs(60)).await);
    let id = created["order_id"].as_str().unwrap();
    let saga = get(&api, &format!("/sagas/{id}")).await;
    assert_eq!(saga["trace_id"], fresh.trace_id().to_string(), "{saga}");
}

#[test]
fn only_requests_answered_with_an_order_count_as_placed() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let placed = move || {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find_map(|(key, _, _, value)| match value {
                DebugValue::Counter(n) if key.key().name() == "ecommerce_orders_placed_total" => {
                    Some(n)
                }
                _ => None,
            })
            .unwrap_or(0)
    };
    // A recorder of this thread's own, not the process's: the tests
    // beside this one place orders too. Every task of the in-memory system
    // runs on this thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let (system, api) = start().await;
            let (status, _) = post_keyed(&api, "cart-1", &seed_order()).await;
            assert_eq!(status, StatusCode::ACCEPTED);
            assert!(system.wait_idle(Duration::from_secs(60)).await);
            let mut changed = seed_order();
            changed["items"][0]["quantity"] = json!(3);
            let (status, _) = post_keyed(&api, "cart-1", &changed).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
            // A retry with the same key and items is answered with the
            // order, and counts again.
            let (status, _) = post_keyed(&api, "cart-1", &seed_order()).await;
            assert_eq!(status, StatusCode::ACCEPTED);
            let (status, _) = call(&api, "POST", "/orders", Some(seed_order())).await;
            assert_eq!(status, StatusCode::ACCEPTED);
            system.shutdown().await;
        })
    });
    assert_eq!(placed(), 3, "the refused request is not an order placed");
}
