//! Client-side fault injection on librdkafka's mock cluster (no broker
//! needed): request errors on Produce, AddOffsetsToTxn and EndTxn, and a
//! broker that goes down, drive the retry, abort and fatal paths.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use saga_core::SagaId;
use saga_kafka::{Error, KafkaConfig, KafkaRuntime, KafkaSagaHandle};

fn mock_config(bootstrap: &str, ns: &str) -> KafkaConfig {
    KafkaConfig::new(bootstrap)
        .app(ns)
        .batch(100, Duration::from_millis(20))
        .session_timeout(Duration::from_secs(6))
        .timeouts(Duration::from_secs(5), Duration::from_secs(2))
        .retries(3, Duration::from_millis(50))
        .partitions(3)
        // The mock cluster does not serve CreateTopics: topics are made below.
        .create_topics(false)
}

async fn wait_owned(orders: &KafkaSagaHandle<Order>, id: &str) {
    let id = SagaId::new(id);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !orders.owned().iter().any(|i| i.id == id) {
        assert!(
            Instant::now() < deadline,
            "saga {id} never reached its owner"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn injected_faults_drive_retry_abort_and_fatal_paths() {
    let mock = MockCluster::new(3).unwrap();
    let ns = ns();
    let t = topics(&ns);
    for topic in [
        format!("{}.replies", t.saga),
        format!("{}.state", t.saga),
        format!("{}.dlq", t.saga),
        t.inventory.clone(),
        t.payments.clone(),
        t.events.clone(),
    ] {
        mock.create_topic(&topic, 3, 1).unwrap();
    }
    let rt = KafkaRuntime::new(mock_config(&mock.bootstrap_servers(), &ns)).unwrap();
    let orders = rt
        .saga(order_saga(&t, Duration::from_millis(100)))
        .await
        .unwrap();

    // Healthy: the start commits, the owner consumes its snapshot.
    orders.start("ok-1", Order::new(1)).await.unwrap();
    wait_owned(&orders, "ok-1").await;

    // Retriable EndTxn errors: retried, the start succeeds.
    let before = rt.stats();
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 2],
    );
    orders.start("retried-1", Order::new(1)).await.unwrap();
    wait_owned(&orders, "retried-1").await;
    assert_eq!(rt.stats().failed_requests, before.failed_requests);

    // AddOffsetsToTxn fails with an error that needs an abort: the consumer
    // batch is aborted, rewound and redone, and the saga still arrives.
    let before = rt.stats();
    mock.request_errors(
        RDKafkaApiKey::AddOffsetsToTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN],
    );
    orders.start("aborted-1", Order::new(1)).await.unwrap();
    wait_owned(&orders, "aborted-1").await;
    let after = rt.stats();
    assert!(
        after.aborts + after.producer_rebuilds > before.aborts + before.producer_rebuilds,
        "no abort: {before:?} -> {after:?}"
    );

    // A fatal EndTxn error (fenced producer): the start fails with a clear
    // error, the producer is rebuilt, the next start works.
    let before = rt.stats();
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    let err = orders.start("fenced-1", Order::new(1)).await.unwrap_err();
    assert!(matches!(err, Error::Transaction { .. }), "{err}");
    assert!(rt.stats().producer_rebuilds > before.producer_rebuilds);
    orders.start("after-fence-1", Order::new(1)).await.unwrap();
    wait_owned(&orders, "after-fence-1").await;

    // Produce keeps failing: retries run out, the transaction is aborted and
    // the caller gets an error it can map to a 5xx.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD; 50],
    );
    let err = orders.start("rejected-1", Order::new(1)).await.unwrap_err();
    assert!(matches!(err, Error::Transaction { .. }), "{err}");
    assert!(err.to_string().contains("nothing was written"), "{err}");
    mock.clear_request_errors(RDKafkaApiKey::Produce);

    // Every broker down: bounded wait, then an error; back up: it works.
    for b in 1..=3 {
        mock.broker_down(b).unwrap();
    }
    let started = Instant::now();
    let err = orders.start("down-1", Order::new(1)).await.unwrap_err();
    eprintln!("broker down: error after {:?}: {err}", started.elapsed());
    assert!(matches!(err, Error::Transaction { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    for b in 1..=3 {
        mock.broker_up(b).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match orders.start("up-1", Order::new(1)).await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "never recovered: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    wait_owned(&orders, "up-1").await;
    // (That failed starts left nothing visible cannot be checked here: the
    // mock cluster does not emulate `read_committed`. The real-broker tests
    // prove atomicity.)
    rt.kill().await;
}
