//! All or nothing on the real broker: `Runtime::publish` and a `start()`
//! whose transaction the broker refuses (a record bigger than a topic's
//! `max.message.bytes`) leave nothing visible to a `read_committed`
//! consumer, return `SagaError::Unavailable` (retryable), and the runtime
//! goes on serving.

mod common;

use std::time::Duration;

use common::*;
use saga_core::{Envelope, MessageId, Runtime, SagaId, SagaStatus, Timestamp};
use saga_kafka::testing::KafkaFixture;
use saga_kafka::KafkaRuntime;

fn event(channel: &str, saga_id: &str, n: usize, bytes: usize) -> Envelope {
    Envelope::event(
        MessageId::new(format!("{saga_id}/event-{n}")),
        channel,
        SagaId::new(saga_id),
        "operator",
        serde_json::json!({"type": "SMS_FALLBACK", "pad": incompressible(bytes)}),
        Timestamp::now(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn publish_is_all_or_nothing() {
    let fx = KafkaFixture::new();
    let wide = fx.topic("notifications");
    let small = fx.topic("small");
    create_topic_with(&fx, &wide, 3, &[]).await;
    create_topic_with(&fx, &small, 1, &[("max.message.bytes", "2048")]).await;
    let rt = KafkaRuntime::new(fx.config("0")).unwrap();

    rt.publish(vec![
        event(&wide, "order-1", 1, 10),
        event(&wide, "order-2", 1, 10),
        event(&small, "order-1", 2, 10),
    ])
    .await
    .unwrap();
    rt.publish(Vec::new()).await.unwrap();

    // One record is too big for its topic: the broker refuses it, the whole
    // transaction is aborted and the caller is told.
    let err = rt
        .publish(vec![
            event(&wide, "order-3", 1, 10),
            event(&small, "order-3", 2, 10_000),
        ])
        .await
        .unwrap_err();
    assert_transaction_refused(&err);

    // The runtime's publisher still works.
    rt.publish(vec![event(&wide, "order-4", 1, 10)])
        .await
        .unwrap();

    let got = fx.read_committed_records(&wide);
    let mut ids: Vec<String> = got
        .iter()
        .map(|r| {
            let e = Envelope::from_bytes(&r.value).unwrap();
            // Keyed by saga id.
            assert_eq!(r.key, e.saga_id.as_str());
            e.id.as_str().to_owned()
        })
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        ["order-1/event-1", "order-2/event-1", "order-4/event-1"],
        "the aborted publish is visible, or something is doubled"
    );
    assert_eq!(fx.read_committed(&small).len(), 1);
    assert_eq!(rt.stats().failed_requests, 1);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn failed_start_leaves_nothing_and_the_next_start_works() {
    let bed = TestBed::new().await;
    let t = &bed.t;
    // The command topic refuses big records; the state topic does not.
    create_topic_with(&bed.fx, &t.inventory, 3, &[("max.message.bytes", "2048")]).await;
    let rt = bed.runtime("0");
    bed.run_participants(&rt).await;
    let orders = bed.orders(&rt, Duration::from_millis(100)).await;
    // The saga's worker owns its partitions: it starts sagas itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rt.stats().owned_partitions < 9 {
        assert!(std::time::Instant::now() < deadline, "{:?}", rt.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Its RESERVE command (with the SKU) is too big for the command topic.
    let mut big = Order::new(100);
    big.sku = incompressible(5000);
    let err = orders.start("big-1", big).await.unwrap_err();
    assert_transaction_refused(&err);
    assert!(err.to_string().contains("nothing was written"), "{err}");

    // The runtime goes on serving.
    let id = orders.start("next-1", Order::new(100)).await.unwrap();
    let done = orders
        .wait_settled(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    assert!(orders.get(&SagaId::new("big-1")).await.unwrap().is_none());
    rt.shutdown().await;

    // None of the failed start's records is visible: state, start snapshot
    // on the reply topic, event, command.
    for topic in [&t.state(), &t.replies(), &t.events, &t.inventory] {
        let recs = bed.fx.read_committed_records(topic);
        assert!(
            recs.iter().all(|r| r.key != "big-1"),
            "a record of the failed start is visible on {topic}"
        );
        assert!(
            recs.iter().any(|r| r.key == "next-1"),
            "{topic} lacks the next saga"
        );
    }
}
