//! At-least-once mode: commands delivered again are answered again but
//! applied once.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use saga_core::testing::eventually;
use saga_core::{Runtime, SagaStatus};
use saga_kafka::{DeliveryMode, KafkaRuntime};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn redelivered_commands_are_applied_once() {
    let bed = TestBed::new().await;
    let t = &bed.t;
    let rt = KafkaRuntime::new(bed.config("0").delivery(DeliveryMode::AtLeastOnce)).unwrap();
    let (inventory, payments) = bed.run_participants(&rt).await;
    let orders = bed.orders(&rt, Duration::from_millis(100)).await;
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
    let replies = t.replies();
    // Each step's command was answered. A reply is written twice only if a
    // batch was redone: at least once, a participant batch whose replies
    // and ledgers were flushed but whose offset commit failed (e.g. refused
    // while its group was rebalancing) is consumed again; the ledger,
    // re-read from its topic, recognises the commands and answers them
    // again without applying them. That is allowed (and counted in
    // `aborts`); anything else writing a reply twice (a second attempt of a
    // step among them) is a bug.
    let first = bed.fx.read_committed(&replies);
    let before = first.len();
    let answered = count_keys(&first);
    assert_eq!(answered.len(), 2 * n, "{answered:?}");
    // No reply overtook its saga's start (it would be dead-lettered as
    // unknown, and the step tried again after its timeout).
    let dead = bed.fx.read_committed(&t.dlq());
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

    // Inject a redelivery of every command (same message ids).
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bed.fx.bootstrap())
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    for topic in [&t.inventory, &t.payments] {
        for env in bed.fx.read_committed(topic) {
            let bytes = env.to_bytes();
            producer
                .send(BaseRecord::to(topic).key(env.key()).payload(&bytes))
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    // Each duplicate is answered again…
    eventually(
        "every duplicate answered",
        Duration::from_secs(30),
        || async { bed.fx.read_committed(&replies).len() >= before + 2 * n },
    )
    .await;
    // …but not run again (the ledgers deduplicate by message id), so each
    // step took effect once, and the sagas are unchanged.
    for (who, applied) in [("inventory", &inventory), ("payments", &payments)] {
        assert_eq!(applied.max_per_command(), 1, "{who} ran a duplicate");
        assert_eq!((applied.steps(), applied.max_per_step()), (n, 1), "{who}");
    }
    for id in &ids {
        let i = orders.get(id).await.unwrap().unwrap();
        assert_eq!(i.status, SagaStatus::Completed);
    }
    rt.shutdown().await;
}
