//! Two orchestrator instances share a saga type's partitions; one leaves
//! while sagas are in flight on both: the other takes its partitions over,
//! restores those sagas (and their timers) and finishes them, and an
//! independent `read_committed` consumer sees every command and event once.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use saga_core::{SagaId, SagaStatus, Timestamp};
use saga_kafka::KafkaRuntime;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn leaving_orchestrator_hands_its_sagas_over() {
    let ns = ns();
    let t = topics(&ns);
    let cfg = config(&ns, "participants-0");
    create_event_topic(&cfg, &t).await;
    let participants = KafkaRuntime::new(cfg).unwrap();
    let (inventory, payments) = run_participants(&participants, &ns, &t).await;

    let backoff = Duration::from_millis(200);
    let a = KafkaRuntime::new(config(&ns, "orchestrator-a")).unwrap();
    let orders_a = a.saga(order_saga(&t, backoff)).await.unwrap();
    let b = KafkaRuntime::new(config(&ns, "orchestrator-b")).unwrap();
    let orders_b = b.saga(order_saga(&t, backoff)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.stats().owned_partitions == 0
        || b.stats().owned_partitions == 0
        || a.stats().owned_partitions + b.stats().owned_partitions != 3
    {
        assert!(
            Instant::now() < deadline,
            "the two never shared the partitions"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let on_a = orders_a.owned().len();
        let on_b = orders_b.owned().len();
        if on_a + on_b == n && on_a > 0 && on_b > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sagas not spread: {on_a} + {on_b}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let in_flight_on_a: Vec<SagaId> = orders_a.owned().into_iter().map(|i| i.id).collect();
    assert!(orders_a.owned().iter().all(|i| !i.status.is_settled()));

    // A leaves while its sagas wait; B takes over.
    let waiting_on_a = orders_a
        .owned()
        .iter()
        .filter(|i| !i.status.is_settled())
        .count();
    assert!(waiting_on_a > 0, "A's sagas finished before it left");
    a.shutdown().await;
    for id in &ids {
        let done = orders_b
            .wait_settled(id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(done.status, SagaStatus::Completed, "{:#?}", done.history);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.stats().owned_partitions != 3 {
        assert!(Instant::now() < deadline, "B never took all partitions");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in &in_flight_on_a {
        assert!(orders_b.owned().iter().any(|i| &i.id == id));
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
        let msgs = read_committed(topic);
        for (mid, k) in counts(&msgs) {
            assert_eq!(k, 1, "{mid} on {topic} seen {k} times");
        }
    }
    assert_eq!(counts(&read_committed(&t.inventory)).len(), n);
    assert_eq!(counts(&read_committed(&t.payments)).len(), n);
    let mut events: HashMap<SagaId, Vec<String>> = HashMap::new();
    for e in read_committed(&t.events) {
        events
            .entry(e.saga_id.clone())
            .or_default()
            .push(e.payload["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(events.len(), n);
    for (id, evs) in events {
        assert_eq!(evs, ["ORDER_CREATED", "ORDER_CONFIRMED"], "{id}");
    }
    assert_eq!((inventory.len(), inventory.max()), (n, 1));
    assert_eq!((payments.len(), payments.max()), (n, 1));
}
