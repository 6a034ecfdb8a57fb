//! Nothing stops a partition for good, and state does not grow with
//! history: every kind of poison record is dead-lettered once (with its
//! origin, truncated if it is large) while the partition goes on; a record
//! the broker refuses gets its input (a message, a timer, a local retry)
//! dead-lettered alone, or stops its partition if it is the input's own
//! state, and batches of small records fit a topic sized for the largest
//! record; a partition whose
//! state cannot be restored is paused and reported, never consumed; starts
//! are idempotent from any instance; settled sagas are deleted (tombstoned)
//! after their retention.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use saga_core::driver::{ledger_topic, partition_for, PARTICIPANT_STATE_KEY};
use saga_core::testing::eventually;
use saga_core::{
    DeadLetter, Envelope, MessageId, Participant, ParticipantContext, ParticipantPolicy,
    ReplyOutcome, RetryPolicy, Runtime, SagaDefinition, SagaId, SagaStatus, Step, StepError,
    Timestamp,
};
use saga_kafka::{DeliveryMode, KafkaRuntime};
use serde_json::json;

/// Every dead letter on `topic`, with the size of its record.
fn dead_letters(bed: &TestBed, topic: &str) -> Vec<(DeadLetter, usize)> {
    bed.fx
        .read_committed_records(topic)
        .into_iter()
        .map(|r| {
            let env = Envelope::from_bytes(&r.value).expect("an envelope");
            (
                DeadLetter::from_envelope(&env).expect("a dead letter"),
                r.value.len() + r.key.len(),
            )
        })
        .collect()
}

/// A record to write as it is: key, value, record-kind header.
type Raw<'a> = (&'a str, Option<&'a [u8]>, Option<&'a str>);

/// 600 KB of bytes that are no JSON.
fn big_garbage() -> Vec<u8> {
    (0..600_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn every_poison_record_is_dead_lettered_once_and_the_partition_goes_on() {
    let bed = TestBed::new().await;
    let t = &bed.t;
    let rt = bed.runtime("0");
    bed.run_participants(&rt).await;
    let orders = bed.orders(&rt, Duration::from_millis(100)).await;
    let done = orders.start("done-1", Order::new(100)).await.unwrap();
    let settled = orders
        .wait_settled(&done, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(settled.status, SagaStatus::Completed);

    let now = Timestamp::now();
    let replies = t.replies();
    let garbage = big_garbage();
    let event = Envelope::event(
        MessageId::new("e-1"),
        &replies,
        SagaId::new("p3"),
        "x",
        json!({}),
        now,
    )
    .to_bytes();
    let to_unknown = reserve_command(&t.inventory, &replies, "p4")
        .reply(ReplyOutcome::Success, json!({"ok": true}), now)
        .unwrap()
        .to_bytes();
    let wrong_schema = reserve_command(&t.inventory, &replies, "done-1")
        .reply(ReplyOutcome::Success, json!("not an Ok_"), now)
        .unwrap()
        .to_bytes();
    // On the saga's reply topic: (key, value, record-kind header).
    let on_replies: Vec<Raw<'_>> = vec![
        ("p1", Some(b"garbage"), None),
        ("p2", None, None),
        ("p3", Some(&event), None),
        ("p4", Some(&to_unknown), None),
        ("p5", Some(b"{not state"), Some("state")),
        ("p6", Some(b"{}"), Some("bogus")),
        ("p7", Some(b"{not a start"), Some("start")),
        ("p8", Some(b"{not an operator"), Some("operator")),
        ("done-1", Some(&wrong_schema), None),
        ("p10", Some(&garbage), None),
    ];
    for (key, value, kind) in &on_replies {
        bed.fx
            .produce_raw(&replies, None, Some(key.as_bytes()), *value, *kind);
    }
    let reply = reserve_command(&t.inventory, &replies, "q4")
        .reply(ReplyOutcome::Success, json!({"ok": true}), now)
        .unwrap()
        .to_bytes();
    // On the inventory's command topic.
    let on_commands: Vec<Raw<'_>> = vec![
        ("q1", Some(b"garbage"), None),
        ("q2", None, None),
        ("q3", Some(&event), None),
        ("q4", Some(&reply), None),
        ("q5", Some(b"{}"), Some("ledger")),
        ("q6", Some(b"{}"), Some("bogus")),
        ("q7", Some(&garbage), None),
    ];
    for (key, value, kind) in &on_commands {
        bed.fx
            .produce_raw(&t.inventory, None, Some(key.as_bytes()), *value, *kind);
    }

    // The partitions go on: an order after the poison completes.
    let after = orders.start("after-1", Order::new(100)).await.unwrap();
    let after = orders
        .wait_settled(&after, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(after.status, SagaStatus::Completed, "{:#?}", after.history);

    // One dead letter per poison record, each under the record size limit,
    // with the record's origin; the big ones keep a truncated copy.
    let limit = saga_core::driver::DEFAULT_MAX_RECORD_BYTES;
    let inventory_dlq = format!("{}.dlq", bed.participant_name("inventory"));
    for (topic, dlq, sent) in [
        (&replies, t.dlq(), on_replies.len()),
        (&t.inventory, inventory_dlq, on_commands.len()),
    ] {
        let mut dead = Vec::new();
        eventually(
            &format!("{sent} dead letters on {dlq}"),
            Duration::from_secs(30),
            || {
                dead = dead_letters(&bed, &dlq);
                let n = dead.len();
                async move { n >= sent }
            },
        )
        .await;
        assert_eq!(dead.len(), sent, "one dead letter each: {dead:#?}");
        let origins: BTreeSet<(u32, u64)> = dead
            .iter()
            .map(|(d, size)| {
                assert!(*size <= limit, "a dead letter of {size} bytes");
                assert!(!d.last_error.is_empty(), "{d:?}");
                let o = d.origin.as_ref().expect("the record's origin");
                assert_eq!(&o.topic, topic);
                (o.partition, o.offset)
            })
            .collect();
        assert_eq!(origins.len(), sent, "distinct records");
        let truncated = dead
            .iter()
            .filter(|(d, _)| d.truncated_from.is_some())
            .count();
        assert_eq!(truncated, 1, "the 600 KB record is kept truncated");
    }
    rt.shutdown().await;
}

/// Answers with a 50 KB payload for saga `big`, a small one otherwise.
struct Wide;

#[async_trait]
impl Participant for Wide {
    type Command = serde_json::Value;
    type Reply = String;
    type Error = StepError;
    async fn handle(
        &self,
        _: serde_json::Value,
        ctx: &mut ParticipantContext,
    ) -> Result<String, StepError> {
        Ok(if ctx.saga_id().as_str() == "big" {
            incompressible(50_000)
        } else {
            "ok".into()
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn a_record_the_broker_refuses_gets_its_input_dead_lettered_alone() {
    a_refused_record(DeliveryMode::ExactlyOnce).await;
}

/// At least once too: a batch whose record failed delivery does not commit
/// its inputs' offsets (before, the flush ended with nothing in flight and
/// the offsets were committed: the reply was lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn at_least_once_a_record_the_broker_refuses_is_not_lost_but_dead_lettered() {
    a_refused_record(DeliveryMode::AtLeastOnce).await;
}

async fn a_refused_record(delivery: DeliveryMode) {
    let bed = TestBed::new().await;
    let commands = bed.fx.topic("wide");
    let replies = bed.fx.topic("wide.replies");
    // The reply topic takes 10 KB records; the runtime's own limit is 1 MB.
    create_topic_with(&bed.fx, &replies, 3, &[("max.message.bytes", "10000")]).await;
    let rt = KafkaRuntime::new(bed.config("0").delivery(delivery)).unwrap();
    let name = bed.participant_name("wide");
    rt.participant(&commands, ParticipantPolicy::new(&name), Wide)
        .await
        .unwrap();
    // Three commands on one partition (same key order as sent).
    for id in ["small-1", "big", "small-2"] {
        let c = reserve_command(&commands, &replies, id);
        bed.fx
            .produce_raw(&commands, Some(0), Some(b"k"), Some(&c.to_bytes()), None);
    }
    let mut got = Vec::new();
    eventually("a reply to each", Duration::from_secs(60), || {
        got = bed.fx.read_committed(&replies);
        let n = got
            .iter()
            .map(|r| r.saga_id.clone())
            .collect::<BTreeSet<_>>()
            .len();
        async move { n >= 3 }
    })
    .await;
    let outcome = |id: &str| {
        got.iter()
            .find(|r| r.saga_id.as_str() == id)
            .and_then(|r| r.outcome.clone())
            .unwrap_or_else(|| panic!("no reply for {id}: {got:#?}"))
    };
    assert_eq!(outcome("small-1"), ReplyOutcome::Success);
    assert_eq!(outcome("small-2"), ReplyOutcome::Success);
    assert!(
        matches!(outcome("big"), ReplyOutcome::Failure { ref error, .. } if error.contains("broker refuses")),
        "{:?}",
        outcome("big")
    );
    let dead = bed.fx.read_committed(&format!("{name}.dlq"));
    if delivery == DeliveryMode::ExactlyOnce {
        assert_eq!(got.len(), 3, "one reply each: {got:#?}");
        assert_eq!(dead.len(), 1, "only the input at fault: {dead:#?}");
    }
    assert!(!dead.is_empty(), "the input at fault is dead-lettered");
    for d in &dead {
        let d = DeadLetter::from_envelope(d).unwrap();
        assert_eq!(
            d.original.saga_id.as_str(),
            "big",
            "only the input at fault"
        );
    }
    let dead = DeadLetter::from_envelope(&dead[0]).unwrap();
    assert_eq!(dead.original.saga_id.as_str(), "big");
    assert!(
        dead.last_error.contains("broker refuses"),
        "{}",
        dead.last_error
    );
    rt.shutdown().await;
}

/// A topic's `max.message.bytes` bounds a record batch: before, the
/// client's batches (up to 1 MB) of small replies were refused by a topic
/// that takes `max_record_bytes`, and each such batch was redone one input
/// at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn a_topic_that_takes_the_largest_record_takes_every_batch_of_small_ones() {
    let bed = TestBed::new().await;
    let commands = bed.fx.topic("wide");
    let replies = bed.fx.topic("wide.replies");
    // The topic and the runtime agree on 10 KB; a batch's replies are more.
    create_topic_with(&bed.fx, &replies, 3, &[("max.message.bytes", "10000")]).await;
    bed.fx.create_topics(&[&commands]).await;
    // Uncompressed: compression only makes a batch smaller than the
    // bound, and the replies (alike) would shrink below it anyway.
    let config = bed.config("0").max_record_bytes(10_000);
    let rt = KafkaRuntime::new(config.set("compression.type", "none")).unwrap();
    let ids: Vec<String> = (0..600).map(|i| format!("small-{i}")).collect();
    let backlog = ids
        .iter()
        .map(|id| reserve_command(&commands, &replies, id))
        .collect();
    rt.publish(backlog).await.unwrap();
    let name = bed.participant_name("wide");
    rt.participant(&commands, ParticipantPolicy::new(&name), Wide)
        .await
        .unwrap();
    let mut got = Vec::new();
    eventually("a reply to each", Duration::from_secs(60), || {
        got = bed.fx.read_committed(&replies);
        let n = got.len();
        async move { n >= 600 }
    })
    .await;
    assert_eq!(rt.stats().aborts, 0, "{:?}", rt.stats());
    assert!(bed.fx.read_committed(&format!("{name}.dlq")).is_empty());
    rt.shutdown().await;
}

/// Fails the first attempt of saga `big`'s command (retryably) and answers
/// its retry with a 200 KB payload; answers the others at once, small.
struct WideOnRetry;

#[async_trait]
impl Participant for WideOnRetry {
    type Command = serde_json::Value;
    type Reply = String;
    type Error = StepError;
    async fn handle(
        &self,
        _: serde_json::Value,
        ctx: &mut ParticipantContext,
    ) -> Result<String, StepError> {
        match (ctx.saga_id().as_str(), ctx.attempt()) {
            ("big", 1) => Err(StepError::retryable("not yet")),
            ("big", _) => Ok(incompressible(200_000)),
            _ => Ok("ok".into()),
        }
    }
}

/// Before, a local retry whose reply the broker refused was retried for
/// ever: due work was never alone in a batch that failed, so it was never
/// pinned on and dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn a_local_retry_whose_reply_the_broker_refuses_is_answered_with_a_failure_once() {
    let bed = TestBed::new().await;
    let commands = bed.fx.topic("wide");
    let replies = bed.fx.topic("wide.replies");
    // The reply topic takes 100 KB (a record, or a batch of the small
    // replies); the runtime's own limit is 1 MB.
    create_topic_with(&bed.fx, &replies, 3, &[("max.message.bytes", "100000")]).await;
    bed.fx.create_topics(&[&commands]).await;
    let rt = bed.runtime("0");
    let commands_of = |ids: &[String]| -> Vec<Envelope> {
        ids.iter()
            .map(|id| reserve_command(&commands, &replies, id))
            .collect()
    };
    // A backlog: the retry, due at once, meets its commands in the next
    // batches (which it fails), not only a batch of its own.
    let mut ids = vec!["small-1".to_owned(), "big".to_owned()];
    ids.extend((0..500).map(|i| format!("load-{i}")));
    rt.publish(commands_of(&ids)).await.unwrap();
    let name = bed.participant_name("wide");
    let retry = RetryPolicy::fixed(Duration::from_millis(1)).with_max_attempts(5);
    rt.participant(
        &commands,
        ParticipantPolicy::new(&name).retry(retry),
        WideOnRetry,
    )
    .await
    .unwrap();
    let replied = |got: &[Envelope], id: &str| got.iter().any(|r| r.saga_id.as_str() == id);
    let mut got = Vec::new();
    eventually("a reply to each", Duration::from_secs(60), || {
        got = bed.fx.read_committed(&replies);
        let all = ids.iter().all(|id| replied(&got, id));
        async move { all }
    })
    .await;
    // The worker goes on after it.
    rt.publish(commands_of(&["small-3".to_owned()]))
        .await
        .unwrap();
    eventually(
        "a reply to the next command",
        Duration::from_secs(60),
        || {
            got = bed.fx.read_committed(&replies);
            let next = replied(&got, "small-3");
            async move { next }
        },
    )
    .await;
    assert_eq!(got.len(), ids.len() + 1, "one reply each: {got:#?}");
    let big = got.iter().find(|r| r.saga_id.as_str() == "big").unwrap();
    assert!(
        matches!(&big.outcome, Some(ReplyOutcome::Failure { error, .. }) if error.contains("broker refuses")),
        "{:?}",
        big.outcome
    );
    let dead = dead_letters(&bed, &format!("{name}.dlq"));
    assert_eq!(dead.len(), 1, "only the retry at fault, once: {dead:#?}");
    let (dead, _) = &dead[0];
    assert_eq!(dead.original.saga_id.as_str(), "big");
    assert_eq!(dead.retry_count, 2, "its two attempts");
    assert!(
        dead.last_error.contains("broker refuses"),
        "{}",
        dead.last_error
    );
    rt.shutdown().await;
}

/// One local step, retried every 100 ms until the order's `ready_at`, which
/// then emits an event on `events` as large as the order's SKU.
fn emitting_saga(t: &Topics, events: &str) -> SagaDefinition<Order> {
    let events = events.to_owned();
    SagaDefinition::<Order>::builder(t.saga.clone())
        .step(
            Step::<Order>::local("wait", move |ctx| {
                if ctx.now().as_millis() < ctx.data().ready_at {
                    return Err(StepError::retryable("not ready yet"));
                }
                let pad = ctx.data().sku.clone();
                ctx.emit(&events, &json!({"type": "READY", "pad": pad}));
                Ok(())
            })
            .retry(RetryPolicy::fixed(Duration::from_millis(100)).with_max_attempts(1000)),
        )
        .build()
        .expect("valid saga")
}

/// Before, a timer whose transition the broker refused was fired for ever
/// (and each time failed a batch, with the other inputs in it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn a_timer_whose_records_the_broker_refuses_is_dead_lettered_once_and_sagas_go_on() {
    let bed = TestBed::new().await;
    let t = &bed.t;
    let small = bed.fx.topic("small.events");
    create_topic_with(&bed.fx, &small, 1, &[("max.message.bytes", "2048")]).await;
    let rt = bed.runtime("0");
    let orders = rt.saga(emitting_saga(t, &small)).await.unwrap();
    // The worker owns its partitions: it starts sagas at once, and their
    // first attempt fails (not ready yet), so a timer runs the next.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rt.stats().owned_partitions < 3 {
        assert!(std::time::Instant::now() < deadline, "{:?}", rt.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let soon = || Timestamp::now().as_millis() + 1_000;
    // Its step's retry, fired by a timer, emits 5 KB on `small`; another
    // saga's fires at about the same time (in the same batch, or not).
    let mut big = Order::new(100);
    big.sku = incompressible(5000);
    big.ready_at = soon();
    let mut next = Order::new(100);
    next.ready_at = big.ready_at;
    orders.start("big-1", big).await.unwrap();
    let id = orders.start("next-1", next).await.unwrap();
    let done = orders
        .wait_settled(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    let mut dead = Vec::new();
    eventually("the timer dead-lettered", Duration::from_secs(60), || {
        dead = dead_letters(&bed, &t.dlq());
        let any = !dead.is_empty();
        async move { any }
    })
    .await;
    // Nothing fires it again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dead = dead_letters(&bed, &t.dlq());
    assert_eq!(dead.len(), 1, "once: {dead:#?}");
    let (dead, _) = &dead[0];
    assert_eq!(dead.original.saga_id.as_str(), "big-1");
    assert!(
        dead.original.id.as_str().contains("timer"),
        "{}",
        dead.original.id
    );
    assert!(
        dead.last_error.contains("broker refuses"),
        "{}",
        dead.last_error
    );
    // The refused saga is left as it was, waiting.
    let big = orders.get(&SagaId::new("big-1")).await.unwrap().unwrap();
    assert_eq!(big.status, SagaStatus::Running, "{big:?}");
    let events = bed.fx.read_committed_records(&small);
    assert!(events.iter().all(|r| r.key != "big-1"), "nothing of big-1");
    assert!(events.iter().any(|r| r.key == "next-1"));
    rt.shutdown().await;
}

/// One local step, retried every 100 ms until the order's `ready_at`, which
/// then makes the data of an order of no items 20 KB.
fn growing_saga(t: &Topics) -> SagaDefinition<Order> {
    SagaDefinition::<Order>::builder(t.saga.clone())
        .step(
            Step::<Order>::local("grow", |ctx| {
                if ctx.now().as_millis() < ctx.data().ready_at {
                    return Err(StepError::retryable("not ready yet"));
                }
                if ctx.data().qty == 0 {
                    ctx.data_mut().sku = incompressible(20_000);
                }
                Ok(())
            })
            .retry(RetryPolicy::fixed(Duration::from_millis(100)).with_max_attempts(1000)),
        )
        .build()
        .expect("valid saga")
}

/// As for a message: due work whose own state the broker refuses stops
/// its partition (reported), and is not dead-lettered at each restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn a_timer_whose_state_the_broker_refuses_stops_its_partition_only() {
    let bed = TestBed::new().await;
    let t = &bed.t;
    let compact = ("cleanup.policy", "compact");
    create_topic_with(
        &bed.fx,
        &t.state(),
        3,
        &[compact, ("max.message.bytes", "8000")],
    )
    .await;
    let rt = bed.runtime("0");
    let orders = rt.saga(growing_saga(t)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rt.stats().owned_partitions < 3 {
        assert!(std::time::Instant::now() < deadline, "{:?}", rt.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let soon = || Timestamp::now().as_millis() + 1_000;
    let mut big = Order::new(100);
    big.ready_at = soon();
    big.qty = 0;
    orders.start("big-1", big).await.unwrap();
    let stopped = partition_for("big-1", 3);
    eventually("its partition reported", Duration::from_secs(60), || {
        let health = rt.health();
        async move {
            health
                .problems
                .iter()
                .any(|p| p.partition == Some(stopped) && p.component == t.saga)
        }
    })
    .await;
    // A saga on another partition goes on (its data stays small).
    let other = (0..)
        .map(|i| format!("next-{i}"))
        .find(|id| partition_for(id, 3) != stopped)
        .unwrap();
    let mut next = Order::new(100);
    next.ready_at = Timestamp::now().as_millis();
    let id = orders.start(other.as_str(), next).await.unwrap();
    let done = orders
        .wait_settled(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    assert!(
        dead_letters(&bed, &t.dlq()).is_empty(),
        "nothing dead-lettered"
    );
    rt.shutdown().await;
}

/// Counts commands per partition; refuses a snapshot that is not a number.
#[derive(Default)]
struct Strict(std::sync::Mutex<BTreeMap<u32, u64>>);

#[async_trait]
impl Participant for Strict {
    type Command = serde_json::Value;
    type Reply = u64;
    type Error = StepError;
    async fn handle(
        &self,
        _: serde_json::Value,
        ctx: &mut ParticipantContext,
    ) -> Result<u64, StepError> {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(ctx.partition()).or_default();
        *n += 1;
        Ok(*n)
    }
    fn snapshot(&self, partition: u32) -> Option<serde_json::Value> {
        self.0.lock().unwrap().get(&partition).map(|n| json!(n))
    }
    fn restore(
        &self,
        partition: u32,
        snapshot: Option<serde_json::Value>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let n = match snapshot {
            None => 0,
            Some(v) => v.as_u64().ok_or("the count is not a number")?,
        };
        self.0.lock().unwrap().insert(partition, n);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn a_partition_whose_state_cannot_be_restored_is_paused_reported_and_not_consumed() {
    let bed = TestBed::new().await;
    let commands = bed.fx.topic("strict");
    let replies = bed.fx.topic("strict.replies");
    let name = bed.participant_name("strict");
    let ledger = ledger_topic(&name);
    create_topic_with(&bed.fx, &commands, 3, &[]).await;
    create_topic_with(&bed.fx, &replies, 3, &[]).await;
    create_topic_with(&bed.fx, &ledger, 3, &[("cleanup.policy", "compact")]).await;
    // Partition 1's state is one the participant refuses.
    let key = PARTICIPANT_STATE_KEY.as_bytes();
    bed.fx.produce_raw(
        &ledger,
        Some(1),
        Some(key),
        Some(b"\"seven\""),
        Some("shard"),
    );
    // A command for partition 0 and one for partition 1.
    let on = |p: u32| {
        (0..)
            .map(|i| format!("s-{i}"))
            .find(|id| partition_for(id, 3) == p)
            .unwrap()
    };
    let (id0, id1) = (on(0), on(1));
    for id in [&id0, &id1] {
        let c = reserve_command(&commands, &replies, id);
        bed.fx.produce_raw(
            &commands,
            None,
            Some(id.as_bytes()),
            Some(&c.to_bytes()),
            None,
        );
    }
    let run = |instance: &str| {
        let rt = bed.runtime(instance);
        let name = name.clone();
        let commands = commands.clone();
        async move {
            rt.participant(&commands, ParticipantPolicy::new(&name), Strict::default())
                .await
                .unwrap();
            rt
        }
    };
    let rt = run("0").await;
    eventually("partition 0 answered", Duration::from_secs(30), || {
        let n = bed.fx.read_committed(&replies).len();
        async move { n >= 1 }
    })
    .await;
    eventually("partition 1 reported", Duration::from_secs(30), || {
        let health = rt.health();
        async move {
            health
                .problems
                .iter()
                .any(|p| p.partition == Some(1) && p.error.contains("not a number"))
        }
    })
    .await;
    let health = rt.health();
    assert_eq!(health.problems.len(), 1, "{health:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answered: Vec<String> = bed
        .fx
        .read_committed(&replies)
        .iter()
        .map(|r| r.saga_id.to_string())
        .collect();
    assert_eq!(
        answered,
        std::slice::from_ref(&id0),
        "partition 1 is not served"
    );
    rt.shutdown().await;

    // Fixed, and restarted: the command of partition 1 was never consumed.
    bed.fx
        .produce_raw(&ledger, Some(1), Some(key), Some(b"7"), Some("shard"));
    let rt = run("0").await;
    eventually("partition 1 answered", Duration::from_secs(60), || {
        let n = bed.fx.read_committed(&replies).len();
        async move { n >= 2 }
    })
    .await;
    let replies = bed.fx.read_committed(&replies);
    let last = replies.iter().find(|r| r.saga_id.as_str() == id1).unwrap();
    assert_eq!(last.payload, json!(8), "counted from the restored state");
    assert!(rt.health().is_ok(), "{:?}", rt.health());
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn starts_are_idempotent_from_any_instance_and_settled_sagas_are_tombstoned() {
    let bed = TestBed::new().await;
    let t = &bed.t;
    let runtime = |instance: &str| {
        KafkaRuntime::new(
            bed.config(instance)
                .settled_retention(Duration::from_secs(3)),
        )
        .unwrap()
    };
    let (a, b) = (runtime("a"), runtime("b"));
    bed.run_participants(&a).await;
    let on_a = a
        .saga(order_saga(t, Duration::from_millis(100)))
        .await
        .unwrap();
    let on_b = b
        .saga(order_saga(t, Duration::from_millis(100)))
        .await
        .unwrap();
    let on_a = Arc::new(on_a);
    let on_b = Arc::new(on_b);
    // Both instances start the same sagas at once: each instance owns some
    // partitions, so some starts go to the other's worker.
    let ids: Vec<String> = (0..12).map(|i| format!("dup-{i}")).collect();
    let mut tasks = Vec::new();
    for id in &ids {
        for h in [on_a.clone(), on_b.clone()] {
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    match h.start(id.as_str(), Order::new(100)).await {
                        Ok(got) => return got,
                        // Until the partitions are assigned and restored.
                        Err(e) if e.is_retryable() => {
                            tokio::time::sleep(Duration::from_millis(300)).await
                        }
                        Err(e) => panic!("{id}: {e}"),
                    }
                }
                panic!("{id} never started");
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Each saga ran once, and past the retention its state is deleted.
    eventually("settled states tombstoned", Duration::from_secs(90), || {
        let mut latest: BTreeMap<String, bool> = BTreeMap::new();
        for r in bed.fx.read_committed_records(&t.state()) {
            latest.insert(r.key.clone(), r.tombstone);
        }
        let all = ids.iter().all(|id| latest.get(id) == Some(&true));
        async move { all }
    })
    .await;
    let events = bed.fx.read_committed(&t.events);
    let reserves = count_keys(&bed.fx.read_committed(&t.inventory));
    for id in &ids {
        assert_eq!(
            event_types(&events, id),
            ["ORDER_CREATED", "ORDER_CONFIRMED"],
            "{id} completed once"
        );
        let key = format!("{}:{id}/reserve/forward", t.saga);
        assert_eq!(reserves.get(&key), Some(&1), "{id} started once");
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Starts that keep a batch short (a linger of 0: each batch commits as
/// soon as a start joined it) do not starve the replies: a batch still
/// takes every reply already received. Before, such a batch ended after
/// one message, replies queued behind a stream of starts without end, and
/// a saga started into that stream settled only once the starts stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn a_stream_of_starts_with_no_linger_does_not_starve_the_replies() {
    let bed = TestBed::new().await;
    let rt = KafkaRuntime::new(bed.config("0").start_linger(Duration::ZERO)).unwrap();
    bed.run_participants(&rt).await;
    let orders = bed.orders(&rt, Duration::from_millis(100)).await;
    let warm = orders.start("warm", Order::new(100)).await.unwrap();
    orders
        .wait_settled(&warm, Duration::from_secs(60))
        .await
        .unwrap();

    // Four callers start sagas back to back until the probe below settles.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut starters = Vec::new();
    for k in 0..4 {
        let (orders, stop) = (orders.clone(), stop.clone());
        starters.push(tokio::spawn(async move {
            // Started, and starts that failed (retried by the next one).
            let (mut n, mut failed) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match orders.start(format!("s{k}-{n}"), Order::new(100)).await {
                    Ok(_) => n += 1,
                    Err(_) => failed += 1,
                }
            }
            (n, failed)
        }));
    }
    // Two seconds in, a saga started into the stream settles while the
    // stream goes on (its two replies queue behind every reply before it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let probe = orders.start("probe", Order::new(100)).await.unwrap();
    let began = std::time::Instant::now();
    let settled = orders.wait_settled(&probe, Duration::from_secs(6)).await;
    let took = began.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut started, mut failed) = (0, 0);
    for s in starters {
        let (n, f) = s.await.unwrap();
        started += n;
        failed += f;
    }
    let settled = settled.unwrap_or_else(|e| {
        panic!("the probe did not settle in {took:?} while {started} sagas started ({failed} starts failed): {e}")
    });
    assert_eq!(settled.status, SagaStatus::Completed);
    // A stream it was: more starts than the probe's own.
    assert!(started > 20, "the stream started {started} sagas");
}
