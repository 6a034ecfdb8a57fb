//! At-least-once mode: commands delivered again are answered again but
//! applied once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use saga_core::{ParticipantPolicy, SagaStatus};
use saga_kafka::{DeliveryMode, KafkaRuntime};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn redelivered_commands_are_applied_once() {
    let ns = ns();
    let t = topics(&ns);
    let cfg = config(&ns, "0").delivery(DeliveryMode::AtLeastOnce);
    create_event_topic(&cfg, &t).await;
    let rt = KafkaRuntime::new(cfg).unwrap();
    let inventory = Applied::default();
    let payments = Applied::default();
    rt.participant(
        &t.inventory,
        ParticipantPolicy::new(format!("{ns}-inventory")),
        Inventory(inventory.clone()),
    )
    .await
    .unwrap();
    rt.participant(
        &t.payments,
        ParticipantPolicy::new(format!("{ns}-payments")),
        Payments(payments.clone()),
    )
    .await
    .unwrap();
    let orders = rt
        .saga(order_saga(&t, Duration::from_millis(100)))
        .await
        .unwrap();
    let n = 5;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            orders
                .start(format!("order-{i}"), Order::new(100))
                .await
                .unwrap(),
        );
    }
    for id in &ids {
        let done = orders
            .wait_settled(id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(done.status, SagaStatus::Completed);
    }
    let replies = format!("{}.replies", t.saga);
    // At least once: a reply may already have been written twice.
    let before = read_committed(&replies).len();
    assert!(before >= 2 * n);

    // Inject a redelivery of every command.
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    for topic in [&t.inventory, &t.payments] {
        for env in read_committed(topic) {
            let bytes = env.to_bytes();
            producer
                .send(BaseRecord::to(topic).key(env.key()).payload(&bytes))
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    // Each duplicate is answered again…
    let deadline = Instant::now() + Duration::from_secs(30);
    while read_committed(&replies).len() < before + 2 * n {
        assert!(Instant::now() < deadline, "duplicates were not answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // …but applied once, and the sagas are unchanged.
    assert_eq!(inventory.max(), 1);
    assert_eq!(inventory.len(), n);
    assert_eq!(payments.max(), 1);
    assert_eq!(payments.len(), n);
    for id in &ids {
        let i = orders.get(id).await.unwrap().unwrap();
        assert_eq!(i.status, SagaStatus::Completed);
    }
    rt.shutdown().await;
}
