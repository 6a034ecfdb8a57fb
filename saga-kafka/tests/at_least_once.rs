//! At-least-once mode: commands delivered again are answered again but
//! applied once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use saga_core::SagaStatus;
use saga_kafka::{DeliveryMode, KafkaRuntime};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn redelivered_commands_are_applied_once() {
    let ns = ns();
    let t = topics(&ns);
    let cfg = config(&ns, "0").delivery(DeliveryMode::AtLeastOnce);
    create_event_topic(&cfg, &t).await;
    let rt = KafkaRuntime::new(cfg).unwrap();
    let (inventory, payments) = run_participants(&rt, &ns, &t).await;
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
    // Each command was answered, under its own reply id. A reply is written
    // twice only if a batch was redone: at least once, a participant batch
    // whose replies and ledgers were flushed but whose offset commit failed
    // (e.g. refused while its group was rebalancing) is consumed again; the
    // ledger, re-read from its topic, recognises the commands and answers
    // them again without applying them. That is allowed (and counted in
    // `aborts`); anything else writing a reply twice is a bug.
    let first = read_committed(&replies);
    let before = first.len();
    let reply_ids = counts(&first);
    assert_eq!(reply_ids.len(), 2 * n, "{reply_ids:?}");
    // No reply overtook its saga's start (it would be dead-lettered as
    // unknown, and the step answered again after its timeout).
    let dead = read_committed(&format!("{}.dlq", t.saga));
    assert!(dead.is_empty(), "{dead:#?}");
    let redone = rt.stats().aborts;
    if redone == 0 {
        assert_eq!(
            before,
            2 * n,
            "a reply was written twice with no batch redone"
        );
    }
    eprintln!(
        "replies: {before} for {} commands, {redone} batches redone",
        2 * n
    );

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
    // …but applied once (the ledgers deduplicate), and the sagas are unchanged.
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
