//! The e-commerce example on a real Kafka broker, every service in this
//! process (`serve --kafka`): the seed's three flows through the HTTP API
//! (in process), with the final states, the stock shards and the analytics.
//!
//! Needs KAFKA_BOOTSTRAP_SERVERS (`scripts/test.sh` sets it). Topics,
//! consumer groups and transactional ids live under a random prefix, so
//! runs sharing one broker do not meet.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::Router;
use serde_json::{json, Value};

mod common;

use common::call;
use ecommerce::messages::Topics;
use ecommerce::notification::FakeOutcome;
use ecommerce::system::{Config, RuntimeKind, System};

fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .expect("KAFKA_BOOTSTRAP_SERVERS (scripts/test.sh starts a broker and sets it)")
}

fn unique(what: &str) -> String {
    format!(
        "{what}-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

async fn start_on_kafka() -> (Arc<System>, Router) {
    let prefix = unique("ecom-flows");
    let config = Config {
        runtime: RuntimeKind::Kafka(bootstrap()),
        topics: Topics::new(prefix.clone()),
        app: Some(prefix.trim_end_matches('.').to_owned()),
        instance_id: Some("0".into()),
        ..Config::default()
    }
    // Fast notification timings: behaviour, not the seed's seconds.
    .fast();
    let system = Arc::new(
        System::start(config)
            .await
            .expect("the system starts on Kafka"),
    );
    let api = ecommerce::http::router(system.clone(), common::api_tokens());
    (system, api)
}

async fn get(api: &Router, path: &str) -> Value {
    let (status, body) = call(api, "GET", path, None).await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    body
}

/// Polls `GET path` until `done` holds (at most `timeout`); returns the body.
async fn poll(api: &Router, path: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = call(api, "GET", path, None).await;
        if status == StatusCode::OK && done(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} did not get there within {timeout:?}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Places an order and waits until its saga settled; returns the order.
async fn place(api: &Router, body: Value) -> Value {
    let (status, created) = call(api, "POST", "/orders", Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(created["status"], "PENDING");
    let id = created["order_id"].as_str().unwrap().to_owned();
    poll(
        api,
        &format!("/orders/{id}"),
        Duration::from_secs(60),
        |o| matches!(o["saga_status"].as_str(), Some("completed" | "compensated")),
    )
    .await
}

/// The `saga_kafka_*` metrics of the table in docs/METRICS.md.
fn documented_kafka_metrics() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/METRICS.md");
    let doc = std::fs::read_to_string(path).expect("docs/METRICS.md");
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(name, _)| name.to_owned())
        .filter(|name| name.starts_with("saga_kafka_"))
        .collect()
}

/// The samples of `name` in a Prometheus text exposition: each one's
/// labels and value.
fn samples(text: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once("} ")?;
            let labels = labels
                .split("\",")
                .filter_map(|kv| kv.split_once("=\""))
                .map(|(k, v)| (k.to_owned(), v.trim_end_matches('"').to_owned()))
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// After the flows, `/metrics` (no token) shows every documented
/// saga-kafka metric, and the order saga's lag for each partition of its
/// reply topic, which drops to 0 once everything is processed.
async fn metrics_after_the_flows(system: &System, api: &Router) {
    let kafka_metrics = documented_kafka_metrics();
    assert!(kafka_metrics.len() >= 8, "{kafka_metrics:?}");
    let group = format!("saga.{}", system.topics.name(ecommerce::order::SAGA));
    let replies = format!("{}.replies", system.topics.name(ecommerce::order::SAGA));
    // Lag is reported every 2 s, from the consumers' statistics.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = ecommerce::demo::call(api, None, "GET", "/metrics", None).await;
        assert_eq!(status, StatusCode::OK);
        let text = body.as_str().expect("the metrics text").to_owned();
        let missing: Vec<&String> = kafka_metrics
            .iter()
            .filter(|name| !text.contains(name.as_str()))
            .collect();
        let lag: Vec<(u32, f64)> = samples(&text, "saga_kafka_consumer_lag")
            .into_iter()
            .filter(|(l, _)| {
                label(l, "group") == Some(group.as_str()) && label(l, "topic") == Some(&replies)
            })
            .filter_map(|(l, v)| Some((label(&l, "partition")?.parse().ok()?, v)))
            .collect();
        let partitions: BTreeSet<u32> = lag.iter().map(|(p, _)| *p).collect();
        let settled = lag.iter().all(|(_, v)| *v == 0.0);
        if missing.is_empty() && partitions == BTreeSet::from([0, 1, 2]) && settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the flows, /metrics lacks {missing:?}, or the lag of {group} on {replies} \
             is not 0 on partitions 0, 1, 2 (got {lag:?}):\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn stock(inventory: &Value, sku: &str) -> (u64, u64) {
    let l = inventory["stock"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["sku"] == sku)
        .unwrap();
    (
        l["reserved"].as_u64().unwrap(),
        l["available"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn the_three_flows_on_kafka_through_the_http_api() {
    let t0 = Instant::now();
    let (system, api) = start_on_kafka().await;
    assert_eq!(get(&api, "/health").await["runtime"], "kafka");

    // Flow 1: 1 laptop, 2 mice -> CONFIRMED, stock reserved, email sent.
    let order1 = place(
        &api,
        json!({"customer_id": "c-ana", "items": [
            {"sku": "LAPTOP-001", "quantity": 1, "unit_price": "999.99"},
            {"sku": "MOUSE-001", "quantity": 2, "unit_price": "29.99"}
        ]}),
    )
    .await;
    assert_eq!(order1["status"], "CONFIRMED", "{order1}");
    assert_eq!(order1["total"], "1059.97");
    assert_eq!(order1["notification"]["status"], "SENT");
    let inv = get(&api, "/inventory").await;
    assert_eq!(stock(&inv, "LAPTOP-001"), (1, 49));
    assert_eq!(stock(&inv, "MOUSE-001"), (2, 198));
    // The stock is split in one shard per partition: 17 / 17 / 16 laptops.
    let shards = inv["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 3);
    let laptops_on_hand: Vec<u64> = shards
        .iter()
        .map(|s| {
            s["stock"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["sku"] == "LAPTOP-001")
                .unwrap()["on_hand"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(laptops_on_hand, [17, 17, 16]);

    // Flow 2: 100 laptops -> refused by the order's shard with its numbers;
    // nothing reserved; the customer is told.
    let order2 = place(
        &api,
        json!({"customer_id": "c-ben", "items": [
            {"sku": "MOUSE-001", "quantity": 1, "unit_price": "29.99"},
            {"sku": "LAPTOP-001", "quantity": 100, "unit_price": "999.99"}
        ]}),
    )
    .await;
    assert_eq!(order2["status"], "CANCELLED", "{order2}");
    assert_eq!(order2["saga_status"], "compensated");
    let reason = order2["reason"].as_str().unwrap();
    let available: u64 = reason
        .strip_prefix("Not enough stock: LAPTOP-001 available ")
        .and_then(|r| r.strip_suffix(", requested 100"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected reason `{reason}`"));
    assert!((15..=17).contains(&available), "{reason}");
    let inv = get(&api, "/inventory").await;
    assert_eq!(stock(&inv, "LAPTOP-001"), (1, 49), "all or nothing");
    assert_eq!(stock(&inv, "MOUSE-001"), (2, 198), "all or nothing");
    // Both emails went out before flow 3 scripts the failures.
    poll(&api, "/analytics", Duration::from_secs(30), |a| {
        a["notifications.sent"] == 2
    })
    .await;

    // Flow 3: the email API times out, then 503, then 500 -> DLQ; the
    // order stays CONFIRMED.
    system.email.script([
        FakeOutcome::Timeout,
        FakeOutcome::Status(503),
        FakeOutcome::Status(500),
    ]);
    let order3 = place(
        &api,
        json!({"customer_id": "c-eva", "items": [
            {"sku": "KEYBOARD-001", "quantity": 1, "unit_price": "79.99"},
            {"sku": "MOUSE-001", "quantity": 1, "unit_price": "29.99"}
        ]}),
    )
    .await;
    assert_eq!(order3["status"], "CONFIRMED", "{order3}");
    assert_eq!(order3["saga_status"], "completed");
    assert_eq!(order3["notification"]["status"], "FAILED");
    assert_eq!(order3["notification"]["attempts"], 3);
    let id3 = order3["order_id"].as_str().unwrap();

    let dlq = poll(&api, "/dlq", Duration::from_secs(30), |d| {
        d["entries"].as_array().is_some_and(|e| !e.is_empty())
    })
    .await;
    let entry = &dlq["entries"][0];
    assert_eq!(entry["order_id"], id3);
    let dead = &entry["dead_letter"];
    assert_eq!(dead["retry_count"], 3);
    assert_eq!(dead["reason"], "max retries reached (3 attempts)");
    assert_eq!(dead["last_error"], "500 Internal Server Error");
    assert_eq!(
        dead["original"]["channel"],
        system
            .topics
            .name(ecommerce::messages::NOTIFICATIONS_REQUESTS)
    );

    let a = poll(&api, "/analytics", Duration::from_secs(30), |a| {
        a["notifications.failed"] == 1 && a["orders.created"] == 3
    })
    .await;
    assert_eq!(a["orders.created"], 3, "{a}");
    assert_eq!(a["orders.confirmed"], 2, "{a}");
    assert_eq!(a["orders.cancelled"], 1, "{a}");
    assert_eq!(a["revenue.confirmed"], "1169.95", "{a}");
    assert_eq!(a["revenue.lost"], "100028.99", "{a}");
    assert_eq!(a["notifications.sent"], 2, "{a}");
    assert_eq!(a["notifications.failed"], 1, "{a}");
    assert_eq!(a["inventory.reservations"], 2, "{a}");
    assert_eq!(a["cancellation_reasons"]["stock"], 1, "{a}");

    // The operator tells the customer by SMS: published on Kafka through
    // the runtime, counted by the analytics.
    let (status, body) = call(&api, "POST", "/dlq/dlq-1/sms", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["by"], common::OPERATOR, "{body}");
    poll(&api, "/analytics", Duration::from_secs(30), |a| {
        a["notifications.sent"] == 3
    })
    .await;

    // The timeline of flow 3 comes from the topics.
    let timeline = get(&api, &format!("/orders/{id3}/timeline")).await;
    let text = timeline.to_string();
    assert!(text.contains("dead letter: max retries reached"), "{text}");

    metrics_after_the_flows(&system, &api).await;

    system.shutdown().await;
    eprintln!(
        "three flows on Kafka in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// The sum of `saga_kafka_consumer_lag` over the partitions of `group`, as
/// the process's recorder renders it (`None` before any is reported).
fn group_lag(group: &str) -> Option<f64> {
    let text = ecommerce::http::metrics_handle().render();
    let lags: Vec<f64> = samples(&text, "saga_kafka_consumer_lag")
        .into_iter()
        .filter(|(l, _)| label(l, "group") == Some(group))
        .map(|(_, v)| v)
        .collect();
    (!lags.is_empty()).then(|| lags.iter().sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn consumer_lag_counts_what_a_slow_projection_has_not_processed_then_drops_to_zero() {
    use saga_core::{Envelope, MessageId, Runtime, SagaId, Timestamp};
    use saga_kafka::testing::KafkaFixture;
    use saga_kafka::KafkaRuntime;

    let _ = ecommerce::http::metrics_handle();
    let fx = KafkaFixture::on(bootstrap());
    let topic = fx.topic("lag.events");
    fx.create_topics(&[&topic]).await;
    let runtime = KafkaRuntime::new(fx.config("0")).expect("a runtime");
    const EVENTS: usize = 60;
    let events: Vec<Envelope> = (0..EVENTS)
        .map(|i| {
            Envelope::event(
                MessageId::new(format!("lag-{i}")),
                topic.clone(),
                SagaId::new(format!("saga-{i}")),
                "lag",
                json!({"n": i}),
                Timestamp::now(),
            )
        })
        .collect();
    runtime
        .publish(events)
        .await
        .expect("the events are written");

    // 100 ms per event: about 6 s of backlog, longer than the 2 s between
    // two statistics reports.
    let group = fx.topic("lag-projection");
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    runtime
        .projection(&group, &[&topic], move |_| {
            std::thread::sleep(Duration::from_millis(100));
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
        .await
        .expect("the projection starts");

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut max_lag = 0.0f64;
    loop {
        let lag = group_lag(&group);
        max_lag = max_lag.max(lag.unwrap_or(0.0));
        let done = seen.load(std::sync::atomic::Ordering::SeqCst) == EVENTS;
        if done && max_lag > 0.0 && lag == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lag of {group}: now {lag:?}, at most {max_lag}; {} of {EVENTS} events handled",
            seen.load(std::sync::atomic::Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(max_lag <= EVENTS as f64, "{max_lag}");
    eprintln!("projection lag peaked at {max_lag} of {EVENTS} events");
    runtime.shutdown().await;
}
