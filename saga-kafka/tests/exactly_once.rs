//! An orchestrator that dies with a transaction open, and restarts: an
//! independent `read_committed` consumer sees every command and event
//! exactly once.

mod common;

use std::time::Duration;

use common::*;
use saga_core::testing::eventually;
use saga_core::{Runtime, SagaStatus};
use saga_kafka::KafkaRuntime;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn orchestrator_dying_mid_transaction_emits_everything_exactly_once() {
    let bed = TestBed::new().await;
    let t = &bed.t;
    let (participants, inventory, payments) = bed.participants().await;

    // Long batches: the transaction that handles the reservation stays open.
    let slow = bed
        .config("orchestrator-0")
        .batch(1000, Duration::from_secs(20))
        .batch_idle(Duration::from_secs(20));
    let first = KafkaRuntime::new(slow).unwrap();
    let orders = bed.orders(&first, Duration::from_millis(100)).await;
    let id = orders.start("order-1", Order::new(500)).await.unwrap();
    eventually(
        "the reply handled in an open transaction",
        Duration::from_secs(30),
        || async { first.stats().pending > 0 },
    )
    .await;
    assert_eq!(first.stats().commits, 1, "only the start is committed");
    first.kill().await;

    // Nothing of the open transaction is visible.
    assert!(bed.fx.read_committed(&t.payments).is_empty());

    // The same instance restarts: it fences the old producer (aborting its
    // transaction), restores the saga from the state topic and redoes the batch.
    let second = bed.runtime("orchestrator-0");
    let orders = bed.orders(&second, Duration::from_millis(100)).await;
    let done = orders
        .wait_settled(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.status, SagaStatus::Completed, "{:#?}", done.history);
    second.shutdown().await;
    participants.shutdown().await;

    for topic in [&t.inventory, &t.payments, &t.events] {
        let msgs = bed.fx.read_committed(topic);
        assert!(!msgs.is_empty(), "{topic} is empty");
        assert_each_once(topic, &msgs);
    }
    assert_eq!(
        event_types(&bed.fx.read_committed(&t.events), "order-1"),
        ["ORDER_CREATED", "ORDER_CONFIRMED"]
    );
    // Each step ran once at its participant: the redone batch sent no
    // second attempt.
    assert_eq!((inventory.steps(), inventory.max_per_step()), (1, 1));
    assert_eq!((payments.steps(), payments.max_per_step()), (1, 1));
}
