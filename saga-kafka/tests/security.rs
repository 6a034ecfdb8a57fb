//! A client whose security settings do not match the cluster fails its
//! first call within seconds, naming the cause, instead of timing out.

use std::time::{Duration, Instant};

use saga_kafka::{ensure_topics, Error, KafkaConfig, TopicSpec};

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
