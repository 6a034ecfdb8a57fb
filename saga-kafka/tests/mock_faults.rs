//! Client-side fault injection on librdkafka's mock cluster (no broker
//! needed): request errors on Produce, AddOffsetsToTxn and EndTxn, and a
//! broker that goes down, drive the retry, abort and fatal paths.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use saga_core::testing::eventually;
use saga_core::SagaHandle;
use saga_kafka::testing::KafkaFixture;
use saga_kafka::{KafkaRuntime, Stats};

/// Waits until saga `id`'s start, made after `since`, has committed in
/// its owner (this runtime) and the handle sees it.
async fn wait_started(rt: &KafkaRuntime, since: &Stats, orders: &SagaHandle<Order>, id: &str) {
    let what = format!("the start of {id} committed by its owner");
    eventually(&what, Duration::from_secs(30), || async {
        rt.stats().commits > since.commits && holds(orders, id).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn injected_faults_drive_retry_abort_and_fatal_paths() {
    let mock = MockCluster::new(3).unwrap();
    let bed = TestBed::names(KafkaFixture::on(mock.bootstrap_servers()));
    let t = &bed.t;
    for topic in [
        t.replies(),
        t.state(),
        t.dlq(),
        t.inventory.clone(),
        t.payments.clone(),
        t.events.clone(),
    ] {
        mock.create_topic(&topic, 3, 1).unwrap();
    }
    let rt = KafkaRuntime::new(bed.mock_config()).unwrap();
    let orders = bed.orders(&rt, Duration::from_millis(100)).await;
    // The worker owns the saga's partitions: it starts sagas in its own
    // transactions.
    eventually(
        "the partitions restored",
        Duration::from_secs(30),
        || async { rt.stats().owned_partitions == 3 },
    )
    .await;

    // Healthy: the start commits, the owner consumes its snapshot.
    let before = rt.stats();
    orders.start("ok-1", Order::new(1)).await.unwrap();
    wait_started(&rt, &before, &orders, "ok-1").await;
    // Its committed transaction counted what it wrote: the saga's state
    // record and its first command, each a JSON text over 100 bytes.
    let after = rt.stats();
    assert!(
        after.records_produced >= before.records_produced + 2,
        "{before:?} -> {after:?}"
    );
    assert!(
        after.bytes_produced >= before.bytes_produced + 200,
        "{before:?} -> {after:?}"
    );

    // Retriable EndTxn errors: retried, the start succeeds.
    let before = rt.stats();
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 2],
    );
    orders.start("retried-1", Order::new(1)).await.unwrap();
    wait_started(&rt, &before, &orders, "retried-1").await;
    assert_eq!(rt.stats().failed_requests, before.failed_requests);

    // AddOffsetsToTxn fails with an error that needs an abort: the batch
    // that consumed a record (here one the saga dead-letters) is aborted,
    // rewound and redone.
    let before = rt.stats();
    mock.request_errors(
        RDKafkaApiKey::AddOffsetsToTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN],
    );
    bed.fx.produce_raw(
        &t.replies(),
        None,
        Some(b"x-1"),
        Some(b"not an envelope"),
        None,
    );
    eventually(
        "the batch redone and committed",
        Duration::from_secs(30),
        || async {
            let s = rt.stats();
            s.commits > before.commits && s.aborts + s.producer_rebuilds > before.aborts
        },
    )
    .await;
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
    assert_transaction_refused(&err);
    assert!(rt.stats().producer_rebuilds > before.producer_rebuilds);
    let before = rt.stats();
    orders.start("after-fence-1", Order::new(1)).await.unwrap();
    wait_started(&rt, &before, &orders, "after-fence-1").await;

    // Produce keeps failing: retries run out, the transaction is aborted and
    // the caller gets an error it can map to a 503.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD; 50],
    );
    let err = orders.start("rejected-1", Order::new(1)).await.unwrap_err();
    assert_transaction_refused(&err);
    assert!(err.to_string().contains("nothing was written"), "{err}");
    mock.clear_request_errors(RDKafkaApiKey::Produce);

    // Every broker down: bounded wait, then an error; back up: it works.
    for b in 1..=3 {
        mock.broker_down(b).unwrap();
    }
    let started = Instant::now();
    let err = orders.start("down-1", Order::new(1)).await.unwrap_err();
    eprintln!("broker down: error after {:?}: {err}", started.elapsed());
    // The request timeout (5 s by default) bounds the wait.
    assert!(err.is_retryable(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    for b in 1..=3 {
        mock.broker_up(b).unwrap();
    }
    let before = rt.stats();
    eventually(
        "a start to succeed once the brokers are back",
        Duration::from_secs(60),
        || async { orders.start("up-1", Order::new(1)).await.is_ok() },
    )
    .await;
    wait_started(&rt, &before, &orders, "up-1").await;
    // (That failed starts left nothing visible cannot be checked here: the
    // mock cluster does not emulate `read_committed`. The real-broker tests
    // prove atomicity.)
    rt.kill().await;
}
