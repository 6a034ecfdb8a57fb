//! A participant's own per-partition state (`Participant::snapshot` /
//! `restore`) commits with its replies and offsets: a participant killed
//! with a transaction open resumes, in a new instance, from the last
//! committed snapshot with no command lost or counted twice; an aborted
//! batch rolls the state back with the transaction.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use saga_core::{ParticipantPolicy, SagaStatus};
use saga_kafka::{ledger_topic, KafkaConfig, KafkaRuntime, SHARD_KEY};

/// No id twice, and exactly `expected`.
fn assert_counted_once(c: &Counter, expected: &BTreeSet<String>) {
    let ids = c.ids();
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), unique.len(), "a command counted twice: {ids:?}");
    assert_eq!(&unique, expected, "lost or foreign commands");
    assert_eq!(c.total(), expected.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn killed_stateful_participant_resumes_from_its_snapshot() {
    let ns = ns();
    let t = topics(&ns);
    let base = config(&ns, "orchestrator-0");
    create_event_topic(&base, &t).await;
    let orchestrator = KafkaRuntime::new(base).unwrap();
    orchestrator
        .participant(
            &t.payments,
            ParticipantPolicy::new(format!("{ns}-payments")),
            Payments(Applied::default()),
        )
        .await
        .unwrap();
    let orders = orchestrator
        .saga(order_saga(&t, Duration::from_millis(100)))
        .await
        .unwrap();
    let inventory = format!("{ns}-inventory");

    // Long batches: when it is killed, the first instance has applied
    // commands in a transaction that never commits.
    let slow = config(&ns, "inventory-0").batch(1000, Duration::from_millis(1500));
    let first = KafkaRuntime::new(slow).unwrap();
    let before = Counter::default();
    first
        .participant(
            &t.inventory,
            ParticipantPolicy::new(inventory.clone()),
            before.clone(),
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            orders
                .start(format!("order-{i}"), Order::new(100))
                .await
                .unwrap(),
        );
    }
    // Some reservations committed (their replies reached the orchestrator)…
    let deadline = Instant::now() + Duration::from_secs(30);
    while !orders.owned().iter().any(|i| i.data.reserved) {
        assert!(Instant::now() < deadline, "no reservation committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // …then more commands are applied in an open transaction, and it dies.
    for i in 6..12 {
        ids.push(
            orders
                .start(format!("order-{i}"), Order::new(100))
                .await
                .unwrap(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while first.stats().pending == 0 {
        assert!(Instant::now() < deadline, "no open transaction to kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill().await;
    let committed_before = before.applied.len();
    assert!(committed_before > 0);

    // A new instance (same instance id: it fences the dead one) restores
    // every partition's snapshot and continues from it.
    let second = KafkaRuntime::new(config(&ns, "inventory-0")).unwrap();
    let after = Counter::default();
    second
        .participant(
            &t.inventory,
            ParticipantPolicy::new(inventory.clone()),
            after.clone(),
        )
        .await
        .unwrap();
    for id in &ids {
        let done = orders
            .wait_settled(id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(done.status, SagaStatus::Completed, "{:#?}", done.history);
    }
    second.shutdown().await;
    orchestrator.shutdown().await;

    let commands: BTreeSet<String> = read_committed(&t.inventory)
        .into_iter()
        .map(|e| e.id.as_str().to_owned())
        .collect();
    assert_eq!(commands.len(), 12);
    // The new instance applied only what the dead one had not committed, and
    // its state counts every command exactly once.
    assert!(
        after.applied.len() < 12,
        "the snapshot was not restored: all commands applied again"
    );
    assert_counted_once(&after, &commands);
    // The committed snapshots, read independently, say the same.
    let mut persisted = BTreeSet::new();
    let mut parts = BTreeSet::new();
    for r in read_committed_raw(&ledger_topic(&inventory)) {
        if r.key == SHARD_KEY {
            assert_eq!(r.record.as_deref(), Some("shard"));
            parts.insert(r.partition);
            // Later snapshots of a partition supersede earlier ones.
            let shard: Shard = serde_json::from_slice(&r.payload).unwrap();
            persisted.retain(|(p, _): &(i32, String)| *p != r.partition);
            persisted.extend(shard.ids.into_iter().map(|id| (r.partition, id)));
        }
    }
    let persisted: BTreeSet<String> = persisted.into_iter().map(|(_, id)| id).collect();
    assert_eq!(persisted, commands);
}

fn mock_config(bootstrap: &str, ns: &str) -> KafkaConfig {
    KafkaConfig::new(bootstrap)
        .app(ns)
        .batch(100, Duration::from_millis(50))
        .session_timeout(Duration::from_secs(6))
        .timeouts(Duration::from_secs(5), Duration::from_secs(2))
        .retries(3, Duration::from_millis(50))
        .partitions(3)
        .create_topics(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aborted_batch_rolls_participant_state_back() {
    let mock = MockCluster::new(3).unwrap();
    let ns = ns();
    let name = format!("{ns}-inventory");
    let channel = format!("{ns}.inventory");
    let replies = format!("{ns}.replies");
    for topic in [
        channel.clone(),
        ledger_topic(&name),
        format!("{name}.dlq"),
        replies.clone(),
    ] {
        mock.create_topic(&topic, 3, 1).unwrap();
    }
    let rt = KafkaRuntime::new(mock_config(&mock.bootstrap_servers(), &ns)).unwrap();
    let counter = Counter::default();
    rt.participant(&channel, ParticipantPolicy::new(name), counter.clone())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rt.stats().owned_partitions < 3 {
        assert!(Instant::now() < deadline, "partitions never assigned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The first batch's offsets cannot be added to its transaction: it is
    // aborted after the participant applied its commands, and redone.
    mock.request_errors(
        RDKafkaApiKey::AddOffsetsToTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN],
    );
    let n = 20;
    let commands: Vec<_> = (0..n)
        .map(|i| reserve_command(&channel, &replies, &format!("order-{i}")))
        .collect();
    let expected: BTreeSet<String> = commands.iter().map(|c| c.id.as_str().to_owned()).collect();
    rt.publish(commands).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = rt.stats();
        if counter.applied.len() == n && s.pending == 0 && counter.total() >= n as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "commands never handled: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = rt.stats();
    assert!(
        s.aborts + s.producer_rebuilds >= 1,
        "nothing aborted: {s:?}"
    );
    assert!(
        counter.applied.sum() > n as u32,
        "the aborted batch applied nothing"
    );
    // Applied again after the abort, but counted once: the state rolled back.
    assert_counted_once(&counter, &expected);
    rt.kill().await;
}
