//! A client whose security settings do not match the cluster fails its
//! first call within seconds, naming the cause, instead of timing out;
//! topics provisioned wrongly are refused by name.

mod common;

use std::time::{Duration, Instant};

use common::{order_saga, TestBed};
use saga_core::{Runtime, SagaError};
use saga_kafka::{ensure_topics, Error, KafkaConfig, KafkaRuntime, TopicSpec};

fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .expect("KAFKA_BOOTSTRAP_SERVERS (scripts/test.sh starts a broker and sets it)")
}

#[tokio::test]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn tls_against_a_plaintext_listener_fails_within_seconds_naming_the_handshake() {
    let config = KafkaConfig::new(bootstrap()).set("security.protocol", "SSL");
    let started = Instant::now();
    let err = ensure_topics(&config, &[TopicSpec::messages("never-created")])
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, Error::Authentication { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("cannot authenticate to Kafka"), "{text}");
    assert!(text.contains("SSL handshake failed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn a_runtime_that_creates_topics_refuses_an_existing_state_topic_that_deletes_by_age() {
    let bed = TestBed::new().await;
    let t = &bed.t;
    let config = bed.config("0");
    // The state topic made by hand before the first start, compacted but
    // also deleting by age: the runtime finds it there and does not
    // create it.
    common::create_topic_with(
        &bed.fx,
        &t.state(),
        3,
        &[
            ("cleanup.policy", "compact,delete"),
            ("retention.ms", "604800000"),
        ],
    )
    .await;
    let text = order_saga_refusal(&KafkaRuntime::new(config).unwrap(), t).await;
    assert!(text.contains(&t.state()), "{text}");
    assert!(text.contains("retention.ms=604800000"), "{text}");
}

/// The error registering the order saga on `rt` fails with, as text with
/// its source: a refusal at start (`SagaError::Runtime`).
async fn order_saga_refusal(rt: &KafkaRuntime, t: &common::Topics) -> String {
    let err = rt
        .saga(order_saga(t, Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(matches!(err, SagaError::Runtime { .. }), "{err:?}");
    format!("{err}: {:?}", std::error::Error::source(&err))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn without_topic_creation_a_state_topic_that_is_not_compacted_is_refused_by_name() {
    let bed = TestBed::new().await;
    let t = &bed.t;
    let config = bed.config("0");
    let mut specs: Vec<TopicSpec> = [
        t.replies(),
        t.inventory.clone(),
        t.payments.clone(),
        t.dlq(),
    ]
    .into_iter()
    .map(TopicSpec::messages)
    .collect();
    // The state topic, wrongly made with the default delete policy.
    specs.push(TopicSpec::messages(t.state()));
    ensure_topics(&config, &specs).await.unwrap();
    let rt = KafkaRuntime::new(config.create_topics(false)).unwrap();
    let text = order_saga_refusal(&rt, t).await;
    assert!(text.contains(&t.state()), "{text}");
    assert!(text.contains("cleanup.policy=delete"), "{text}");
}
