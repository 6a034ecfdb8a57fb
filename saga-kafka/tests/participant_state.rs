//! A participant's own per-partition state (`Participant::snapshot` /
//! `restore`) commits with its replies and offsets: a participant killed
//! with a transaction open resumes, in a new instance, from the last
//! committed snapshot with no command lost or counted twice; an aborted
//! batch rolls the state back with the transaction.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use saga_core::driver::{ledger_topic, PARTICIPANT_STATE_KEY};
use saga_core::testing::eventually;
use saga_core::{ParticipantPolicy, Runtime, SagaStatus};
use saga_kafka::testing::KafkaFixture;
use saga_kafka::KafkaRuntime;

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
    let bed = TestBed::new().await;
    let t = &bed.t;
    let orchestrator = bed.runtime("orchestrator-0");
    orchestrator
        .participant(
            &t.payments,
            ParticipantPolicy::new(bed.participant_name("payments")),
            Payments(Applied::default()),
        )
        .await
        .unwrap();
    let orders = bed.orders(&orchestrator, Duration::from_millis(100)).await;
    let inventory = bed.participant_name("inventory");

    // Long batches: when it is killed, the first instance has applied
    // commands in a transaction that never commits.
    let slow = bed
        .config("inventory-0")
        .batch(1000, Duration::from_millis(1500))
        .batch_idle(Duration::from_millis(1500));
    let first = KafkaRuntime::new(slow).unwrap();
    let before = Counter::default();
    first
        .participant(
            &t.inventory,
            // One at a time, each command handled as it arrives (not when
            // the batch ends), so the batch holds applied commands while it
            // stays open.
            ParticipantPolicy::new(inventory.clone()).concurrency(1),
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
    eventually(
        "a reservation committed",
        Duration::from_secs(30),
        || async { owned(&orders).await.iter().any(|i| i.data.reserved) },
    )
    .await;
    // …then more commands are applied in an open transaction, and it dies.
    for i in 6..12 {
        ids.push(
            orders
                .start(format!("order-{i}"), Order::new(100))
                .await
                .unwrap(),
        );
    }
    eventually(
        "an open transaction to kill",
        Duration::from_secs(30),
        || async { first.stats().pending > 0 },
    )
    .await;
    first.kill().await;
    assert!(before.applied.commands() > 0);

    // A new instance (same instance id: it fences the dead one) restores
    // every partition's snapshot and continues from it.
    let second = bed.runtime("inventory-0");
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

    let sent = bed.fx.read_committed(&t.inventory);
    assert_eq!(count_keys(&sent).len(), 12, "one reservation per saga");
    let commands: BTreeSet<String> = sent.iter().map(|e| e.id.as_str().to_owned()).collect();
    // The new instance applied only what the dead one had not committed, and
    // its state counts every command exactly once.
    assert!(
        after.applied.commands() < commands.len(),
        "the snapshot was not restored: all commands applied again"
    );
    assert_counted_once(&after, &commands);
    // The committed snapshots, read independently, say the same (the
    // latest snapshot of each partition supersedes the earlier ones).
    let mut latest: BTreeMap<i32, Shard> = BTreeMap::new();
    for r in bed.fx.read_committed_records(&ledger_topic(&inventory)) {
        if r.key == PARTICIPANT_STATE_KEY {
            assert_eq!(r.kind.as_deref(), Some("shard"));
            latest.insert(r.partition, serde_json::from_slice(&r.value).unwrap());
        } else {
            // Restored by key: ledger entries go without the header.
            assert_eq!(r.kind, None, "ledger entry {}", r.key);
        }
    }
    let persisted: BTreeSet<String> = latest.into_values().flat_map(|s| s.ids).collect();
    assert_eq!(persisted, commands);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aborted_batch_rolls_participant_state_back() {
    let mock = MockCluster::new(3).unwrap();
    let bed = TestBed::names(KafkaFixture::on(mock.bootstrap_servers()));
    let name = bed.participant_name("inventory");
    let channel = bed.t.inventory.clone();
    let replies = bed.t.replies();
    for topic in [
        channel.clone(),
        ledger_topic(&name),
        format!("{name}.dlq"),
        replies.clone(),
    ] {
        mock.create_topic(&topic, 3, 1).unwrap();
    }
    let rt = KafkaRuntime::new(bed.mock_config()).unwrap();
    let counter = Counter::default();
    rt.participant(&channel, ParticipantPolicy::new(name), counter.clone())
        .await
        .unwrap();
    eventually(
        "all partitions assigned",
        Duration::from_secs(30),
        || async { rt.stats().owned_partitions == 3 },
    )
    .await;

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

    // Done when a batch was aborted, every command is handled and counted
    // once more, and nothing is left open. A state that kept the aborted
    // batch's counts would count above `n` and never get here.
    eventually(
        "the batch aborted, redone and committed",
        Duration::from_secs(30),
        || async {
            let s = rt.stats();
            s.aborts + s.producer_rebuilds >= 1
                && s.pending == 0
                && counter.applied.commands() == n
                && counter.total() == n as u64
        },
    )
    .await;
    assert!(
        counter.applied.runs() > n as u32,
        "the aborted batch applied nothing"
    );
    // Applied again after the abort, but counted once: the state rolled back.
    assert_counted_once(&counter, &expected);
    rt.kill().await;
}
