//! The e-commerce example's Kafka mode when the broker cannot take a
//! write, on librdkafka's mock cluster (no broker needed, runs under plain
//! `cargo test`): every service in this process (`serve --kafka`), an order
//! goes through; with the broker down `POST /orders` answers 503
//! `"retryable": true` with `Retry-After` within the runtime's request
//! timeout; with the broker back the client's retries with the same
//! `Idempotency-Key` get exactly one order.
//!
//! What the mock cannot show: it does not emulate `read_committed`, so
//! records of an *aborted* transaction would be visible to its consumers.
//! The broker is taken down before the order is produced, so nothing of
//! it reaches the log here; that an aborted transaction stays invisible is
//! proven against a real broker (saga-kafka's `atomicity` tests).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use rdkafka::mocking::MockCluster;
use saga_kafka::KafkaConfig;
use serde_json::{json, Value};
use tower::ServiceExt;

mod common;

use common::call;
use ecommerce::messages::{OrderEvent, Topics};
use ecommerce::system::{Config, RuntimeKind, Services, System};

/// The broker of the one-node mock cluster.
const BROKER: i32 = 1;

/// How long a refused write may take to be answered: the request
/// timeout (5 s by default) and some slack.
const REFUSAL_BOUND: Duration = Duration::from_secs(8);

fn order_body() -> Value {
    json!({"customer_id": "c-ana", "items": [
        {"sku": "LAPTOP-001", "quantity": 1, "unit_price": "999.99"},
        {"sku": "MOUSE-001", "quantity": 2, "unit_price": "29.99"}
    ]})
}

/// `POST /orders` with `Idempotency-Key` `key`: the status, the
/// `Retry-After` header and the body.
async fn post_order(api: &Router, key: &str) -> (StatusCode, Option<String>, Value) {
    let req = Request::builder()
        .method("POST")
        .uri("/orders")
        .header("content-type", "application/json")
        .header(
            "authorization",
            format!("Bearer {}", common::OPERATOR_TOKEN),
        )
        .header("idempotency-key", key)
        .body(Body::from(order_body().to_string()))
        .unwrap();
    let res = api.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let retry_after = res
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, retry_after, body)
}

/// Asserts a refused write: 503, `"retryable": true`, `Retry-After`.
fn assert_retryable_refusal(status: StatusCode, retry_after: Option<&str>, body: &Value) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["retryable"], true, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("retry with the same Idempotency-Key"),
        "{body}"
    );
    assert_eq!(retry_after, Some("1"), "{body}");
}

/// Polls `GET /orders/{id}` until its saga settled; returns the order.
async fn settled(api: &Router, id: &str) -> Value {
    let path = format!("/orders/{id}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = call(api, "GET", &path, None).await;
        if status == StatusCode::OK
            && matches!(
                body["saga_status"].as_str(),
                Some("completed" | "compensated")
            )
        {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "order {id} did not settle; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The ids `GET /orders` lists.
async fn listed(api: &Router) -> BTreeSet<String> {
    let (status, body) = call(api, "GET", "/orders", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["order_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The orders an `ORDER_CREATED` event was published for (as the order
/// process's timeline projection saw them).
fn created_events(system: &System) -> BTreeSet<String> {
    system
        .read(&system.topics.name(ecommerce::messages::ORDERS_EVENTS))
        .into_iter()
        .filter_map(|e| match serde_json::from_value(e.payload) {
            Ok(OrderEvent::OrderCreated { order_id, .. }) => Some(order_id),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_that_cannot_take_the_write_gets_a_retryable_503_and_nothing_half_done() {
    let t0 = Instant::now();
    let mock = MockCluster::new(1).expect("librdkafka's mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let config = Config {
        runtime: RuntimeKind::Kafka(bootstrap.clone()),
        services: Services::ALL,
        topics: Topics::default(),
        // The mock does not serve CreateTopics: every topic is made below.
        create_topics: false,
        ..Config::default()
    }
    .fast();
    for spec in ecommerce::system::kafka::kafka_topics(&config).unwrap() {
        mock.create_topic(&spec.name, 3, 1).unwrap();
    }
    // Small timeouts and retries: a refused write is answered in seconds.
    let kcfg = KafkaConfig::new(&bootstrap)
        .app("ecom-mock")
        .instance_id("0")
        .partitions(3)
        .batch(100, Duration::from_millis(20))
        .session_timeout(Duration::from_secs(6))
        .timeouts(Duration::from_secs(5), Duration::from_secs(2))
        .retries(3, Duration::from_millis(50));
    let system = Arc::new(
        System::on_kafka_with(config, kcfg)
            .await
            .expect("the system starts on the mock cluster"),
    );
    let api = ecommerce::http::router(system.clone(), common::api_tokens());
    let (status, health) = call(&api, "GET", "/health", None).await;
    assert_eq!(
        (status, &health["runtime"]),
        (StatusCode::OK, &json!("kafka"))
    );

    // A healthy broker: the order is accepted and goes through.
    let (status, _, created) = post_order(&api, "first").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(created["status"], "PENDING");
    let first = created["order_id"].as_str().unwrap().to_owned();
    let order = settled(&api, &first).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    eprintln!("first order confirmed at {:?}", t0.elapsed());
    let before = listed(&api).await;
    assert_eq!(before, BTreeSet::from([first.clone()]));

    // The broker cannot take the write: a retryable 503, in bounded time.
    mock.broker_down(BROKER).unwrap();
    let refused_at = Instant::now();
    let (status, retry_after, body) = post_order(&api, "second").await;
    let took = refused_at.elapsed();
    eprintln!("broker down: {status} after {took:?}: {body}");
    assert_retryable_refusal(status, retry_after.as_deref(), &body);
    assert!(took < REFUSAL_BOUND, "the refusal took {took:?}");
    assert!(body.get("order_id").is_none(), "{body}");
    // Reads answer from what the process holds, or 503 in bounded time.
    let read_at = Instant::now();
    let (status, held) = call(&api, "GET", &format!("/orders/{first}"), None).await;
    assert_eq!(
        (status, &held["status"]),
        (StatusCode::OK, &json!("CONFIRMED"))
    );
    let (status, unknown) = call(&api, "GET", "/orders/ORD-NOT-HELD", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{unknown}");
    assert!(
        read_at.elapsed() < REFUSAL_BOUND,
        "reads took {:?}",
        read_at.elapsed()
    );

    // The broker is back: the client retrying with the same key gets its
    // order in, once. Refusals while the clients reconnect are retryable.
    mock.broker_up(BROKER).unwrap();
    let up_at = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    let second = loop {
        let (status, retry_after, body) = post_order(&api, "second").await;
        if status == StatusCode::ACCEPTED {
            break body["order_id"].as_str().unwrap().to_owned();
        }
        assert_retryable_refusal(status, retry_after.as_deref(), &body);
        assert!(Instant::now() < deadline, "never recovered: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("broker up: an order accepted after {:?}", up_at.elapsed());
    let order = settled(&api, &second).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    // Retried once more after it went through: the same order, as it is.
    let (status, _, again) = post_order(&api, "second").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(
        (&again["order_id"], &again["status"]),
        (&json!(second), &json!("CONFIRMED"))
    );

    // One order per key: the orders known are the two accepted ones, and
    // ORDER_CREATED was published for them only.
    let expected = BTreeSet::from([first.clone(), second.clone()]);
    assert_eq!(listed(&api).await, expected);
    let deadline = Instant::now() + Duration::from_secs(10);
    while created_events(&system) != expected {
        assert!(
            Instant::now() < deadline,
            "ORDER_CREATED for {:?}, expected {expected:?}",
            created_events(&system)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, a) = call(&api, "GET", "/analytics", None).await;
        assert_eq!(status, StatusCode::OK, "{a}");
        if a["orders.confirmed"] == 2 {
            assert_eq!(a["orders.created"], 2, "{a}");
            break;
        }
        assert!(Instant::now() < deadline, "analytics: {a}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    system.shutdown().await;
    drop(mock);
    eprintln!(
        "broker faults on the mock cluster in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
