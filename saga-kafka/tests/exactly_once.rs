//! An orchestrator that dies with a transaction open, and restarts: an
//! independent `read_committed` consumer sees every command and event
//! exactly once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use saga_core::{SagaId, SagaStatus};
use saga_kafka::KafkaRuntime;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn orchestrator_dying_mid_transaction_emits_everything_exactly_once() {
    let ns = ns();
    let t = topics(&ns);
    let base = config(&ns, "orchestrator-0");
    create_event_topic(&base, &t).await;
    let participants = KafkaRuntime::new(config(&ns, "participants-0")).unwrap();
    let (inventory, payments) = run_participants(&participants, &ns, &t).await;

    // Long batches: the transaction that handles the reservation stays open.
    let slow = base.clone().batch(1000, Duration::from_secs(20));
    let first = KafkaRuntime::new(slow).unwrap();
    let orders = first
        .saga(order_saga(&t, Duration::from_millis(100)))
        .await
        .unwrap();
    let id = orders.start("order-1", Order::new(500)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while first.stats().pending == 0 {
        assert!(Instant::now() < deadline, "the reply was never handled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(first.stats().commits, 1, "only the start is committed");
    first.kill().await;

    // Nothing of the open transaction is visible.
    assert!(read_committed(&t.payments).is_empty());

    // The same instance restarts: it fences the old producer (aborting its
    // transaction), restores the saga from the state topic and redoes the batch.
    let second = KafkaRuntime::new(base).unwrap();
    let orders = second
        .saga(order_saga(&t, Duration::from_millis(100)))
        .await
        .unwrap();
    let done = orders
        .wait_settled(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.status, SagaStatus::Completed, "{:#?}", done.history);
    second.shutdown().await;
    participants.shutdown().await;

    for topic in [&t.inventory, &t.payments, &t.events] {
        let msgs = read_committed(topic);
        assert!(!msgs.is_empty(), "{topic} is empty");
        for (mid, n) in counts(&msgs) {
            assert_eq!(n, 1, "{mid} on {topic} seen {n} times");
        }
    }
    let events: Vec<String> = read_committed(&t.events)
        .iter()
        .filter(|e| e.saga_id == SagaId::new("order-1"))
        .map(|e| e.payload["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(events, ["ORDER_CREATED", "ORDER_CONFIRMED"]);
    assert_eq!(inventory.max(), 1);
    assert_eq!(payments.max(), 1);
    assert_eq!(payments.len(), 1);
}
