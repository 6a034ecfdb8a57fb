//! Two orchestrator instances share a saga type's partitions; one leaves
//! while sagas are in flight on both: the other takes its partitions over,
//! restores those sagas (and their timers) and finishes them, and an
//! independent `read_committed` consumer sees every command and event once.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use saga_core::testing::eventually;
use saga_core::{Runtime, SagaId, SagaStatus, Timestamp};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn leaving_orchestrator_hands_its_sagas_over() {
    let bed = TestBed::new().await;
    let t = &bed.t;
    let (participants, inventory, payments) = bed.participants().await;

    let backoff = Duration::from_millis(200);
    let a = bed.runtime("orchestrator-a");
    let orders_a = bed.orders(&a, backoff).await;
    let b = bed.runtime("orchestrator-b");
    let orders_b = bed.orders(&b, backoff).await;
    eventually(
        "the two to share the partitions",
        Duration::from_secs(30),
        || async {
            let (on_a, on_b) = (a.stats().owned_partitions, b.stats().owned_partitions);
            on_a > 0 && on_b > 0 && on_a + on_b == 3
        },
    )
    .await;

    // Every saga waits (on backoff timers) until well after A has left.
    let n = 24;
    let ready_at = Timestamp::now().as_millis() + 5_000;
    let mut ids = Vec::new();
    for i in 0..n {
        let mut order = Order::new(100);
        order.ready_at = ready_at;
        let handle = if i % 2 == 0 { &orders_a } else { &orders_b };
        ids.push(handle.start(format!("order-{i}"), order).await.unwrap());
    }
    eventually(
        "the sagas spread over both",
        Duration::from_secs(30),
        || async {
            let on_a = owned(&orders_a).await.len();
            let on_b = owned(&orders_b).await.len();
            on_a + on_b == n && on_a > 0 && on_b > 0
        },
    )
    .await;

    // A leaves while its sagas wait; B takes over.
    let on_a = owned(&orders_a).await;
    assert!(
        on_a.iter().all(|i| !i.status.is_settled()),
        "A's sagas finished before it left"
    );
    let in_flight_on_a: Vec<SagaId> = on_a.into_iter().map(|i| i.id).collect();
    a.shutdown().await;
    for id in &ids {
        let done = orders_b
            .wait_settled(id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(done.status, SagaStatus::Completed, "{:#?}", done.history);
    }
    eventually(
        "B to take all partitions",
        Duration::from_secs(30),
        || async { b.stats().owned_partitions == 3 },
    )
    .await;
    let on_b = owned(&orders_b).await;
    for id in &in_flight_on_a {
        assert!(on_b.iter().any(|i| &i.id == id), "B does not hold {id}");
    }
    // The handle of the instance that left reads them from the state topic
    // (only the partition each id hashes to).
    for id in &ids[..4] {
        let i = orders_a.get(id).await.unwrap().unwrap();
        assert_eq!(i.status, SagaStatus::Completed);
    }
    assert!(orders_a.get(&SagaId::new("nope")).await.unwrap().is_none());
    b.shutdown().await;
    participants.shutdown().await;

    // Nothing lost, nothing doubled.
    for topic in [&t.inventory, &t.payments, &t.events] {
        assert_each_once(topic, &bed.fx.read_committed(topic));
    }
    assert_eq!(count_keys(&bed.fx.read_committed(&t.inventory)).len(), n);
    assert_eq!(count_keys(&bed.fx.read_committed(&t.payments)).len(), n);
    let mut events: HashMap<SagaId, Vec<String>> = HashMap::new();
    for e in bed.fx.read_committed(&t.events) {
        events
            .entry(e.saga_id.clone())
            .or_default()
            .push(e.payload["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(events.len(), n);
    for (id, evs) in events {
        assert_eq!(evs, ["ORDER_CREATED", "ORDER_CONFIRMED"], "{id}");
    }
    assert_eq!((inventory.steps(), inventory.max_per_step()), (n, 1));
    assert_eq!((payments.steps(), payments.max_per_step()), (n, 1));
}
