//! Operating sagas on Kafka: a query through any instance's handle covers
//! every partition (the saga type's catalog follows the state topic), and
//! an operator's action reaches the saga's owner wherever it runs.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::TestBed;
use saga_core::driver::{partition_for, TimerKind};
use saga_core::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The tests of this file one at a time: one counts the catalogs' reader
/// threads, which the others start.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Payment {
    charged: bool,
}

/// One pivot step on `channel`: 1 s per attempt, one attempt, so a saga
/// whose participant does not answer parks within seconds.
fn payment_saga(name: &str, channel: &str) -> SagaDefinition<Payment> {
    SagaDefinition::<Payment>::builder(name)
        .step(
            Step::remote("charge", channel)
                .command(|_: &Payment| "CHARGE")
                .on_reply(|ctx, _: Value| {
                    ctx.data_mut().charged = true;
                    Ok(())
                })
                .timeout(Duration::from_secs(1))
                .retry(RetryPolicy::fixed(Duration::from_millis(100)).with_max_attempts(1))
                .pivot(),
        )
        .build()
        .unwrap()
}

/// A bank that is down (a retryable failure: the pivot's outcome is
/// unknown, the saga parks) until `up` is set.
#[derive(Clone, Default)]
struct Bank {
    up: Arc<AtomicBool>,
    /// The sagas whose command it answered while down.
    refused: Arc<std::sync::Mutex<HashSet<SagaId>>>,
}

#[async_trait]
impl Participant for Bank {
    type Command = Value;
    type Reply = Value;
    type Error = StepError;

    async fn handle(&self, _: Value, ctx: &mut ParticipantContext) -> Result<Value, StepError> {
        if self.up.load(Ordering::SeqCst) {
            Ok(serde_json::json!({"charged": true}))
        } else {
            self.refused.lock().unwrap().insert(ctx.saga_id().clone());
            Err(StepError::retryable("the bank is down"))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn a_query_finds_parked_sagas_of_every_instance_and_a_retry_completes_them() {
    let _serial = SERIAL.lock().await;
    let bed = TestBed::new().await;
    let name = bed.fx.topic("payment");
    let channel = bed.fx.topic("bank");
    let a = bed.runtime("a");
    let b = bed.runtime("b");
    let sagas_a = a.saga(payment_saga(&name, &channel)).await.unwrap();
    let _sagas_b = b.saga(payment_saga(&name, &channel)).await.unwrap();
    // The bank runs on b: a's partitions are only the saga's.
    let bank = Bank::default();
    b.participant(
        &channel,
        ParticipantPolicy::new(bed.fx.topic("bank")).retry(RetryPolicy::no_retry()),
        bank.clone(),
    )
    .await
    .unwrap();

    // Ids on every partition of the three; the bank is down, so every saga
    // parks with its pivot's outcome unknown.
    let mut ids: Vec<SagaId> = Vec::new();
    let mut n = 0;
    while (0..3).any(|p| !ids.iter().any(|id| partition_for(id.as_str(), 3) == p)) || ids.len() < 6
    {
        let id = SagaId::new(format!("pay-{n}"));
        n += 1;
        sagas_a.start(id.clone(), Payment::default()).await.unwrap();
        ids.push(id);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let parked = loop {
        let page = sagas_a
            .list(&SagaQuery::all().status(StatusFilter::Parked))
            .await
            .unwrap();
        // Both instances in the group (the rebalance may trail the starts),
        // and every command answered: one the bank has not seen yet would
        // park its saga by its deadline, and succeed once the bank is up,
        // before the operator's retry.
        if page.items.len() == ids.len()
            && a.stats().owned_partitions < 3
            && bank.refused.lock().unwrap().len() == ids.len()
        {
            break page;
        }
        assert!(Instant::now() < deadline, "parked: {:?}", page.items.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(parked.as_of.is_some(), "the catalog says how fresh it is");
    let owned = a.stats().owned_partitions;
    assert!(
        owned < 3,
        "instance a owns {owned} of 3 partitions: b owns the rest, and their sagas are listed too"
    );
    for inst in &parked.items {
        assert_eq!(&*inst.steps[0].name, "charge");
    }
    // An action for another step is refused at once, not sent to the owner.
    let err = sagas_a
        .operate(&ids[0], Operation::retry("alice").on_step("refund"))
        .await
        .unwrap_err();
    assert!(matches!(err, SagaError::InvalidAction { .. }), "{err:?}");

    // The fault is fixed; the operator retries each saga through a (some
    // are owned by b: the request goes to their owner).
    bank.up.store(true, Ordering::SeqCst);
    for id in &ids {
        sagas_a
            .operate(
                id,
                Operation::retry("alice")
                    .note("the bank is back")
                    .on_step("charge"),
            )
            .await
            .unwrap();
    }
    for id in &ids {
        // The owner applies a request after `operate` returns (it is
        // durable then, not applied): until it has, the saga reads parked.
        let deadline = Instant::now() + Duration::from_secs(60);
        let done = loop {
            let inst = sagas_a
                .wait_settled(id, Duration::from_secs(60))
                .await
                .unwrap();
            if inst
                .history
                .iter()
                .any(|h| h.what.contains("operator: retry"))
            {
                break inst;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: the retry was never applied: {:?}",
                inst.history
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            done.status,
            SagaStatus::Completed,
            "{id}: {:?}",
            done.history
        );
        assert!(done.data.charged);
        let entry = done
            .history
            .iter()
            .find(|h| h.what.contains("operator: retry"))
            .expect("the retry is in the history");
        assert_eq!(entry.operator.as_deref(), Some("alice"));
        assert_eq!(entry.note.as_deref(), Some("the bank is back"));
    }
    // The sagas b owns reach a's listing through the catalog, which
    // follows the state topic a moment behind.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = sagas_a
            .list(&SagaQuery::all().status(StatusFilter::Parked))
            .await
            .unwrap();
        if left.items.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still parked: {}",
            left.items.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn a_saga_stuck_on_a_long_backoff_is_found_and_retried_now_through_another_instance() {
    let _serial = SERIAL.lock().await;
    let bed = TestBed::new().await;
    let name = bed.fx.topic("stuck");
    let channel = bed.fx.topic("bank");
    // The bank fails retryably and the next attempt is an hour away: the
    // saga is running, not parked, and nothing moves by itself.
    let saga = || {
        SagaDefinition::<Payment>::builder(&name)
            .step(
                Step::remote("charge", &channel)
                    .command(|_: &Payment| "CHARGE")
                    .on_reply(|ctx, _: Value| {
                        ctx.data_mut().charged = true;
                        Ok(())
                    })
                    .timeout(Duration::from_secs(5))
                    .retry(RetryPolicy::fixed(Duration::from_secs(3600)).with_max_attempts(3)),
            )
            .build()
            .unwrap()
    };
    let a = bed.runtime("a");
    let b = bed.runtime("b");
    let sagas_b = b.saga(saga()).await.unwrap();
    let bank = Bank::default();
    b.participant(
        &channel,
        ParticipantPolicy::new(bed.fx.topic("bank")).retry(RetryPolicy::no_retry()),
        bank.clone(),
    )
    .await
    .unwrap();
    // a joins after the start and only queries and operates: whichever
    // instance owns the saga after the rebalance, a's handle reaches it.
    let id = SagaId::new("stuck-1");
    sagas_b.start(id.clone(), Payment::default()).await.unwrap();
    let sagas_a = a.saga(saga()).await.unwrap();

    let query = SagaQuery::all()
        .status(StatusFilter::Active)
        .older_than(Duration::from_millis(500));
    let deadline = Instant::now() + Duration::from_secs(60);
    // Listed, and waiting out its backoff: the bank refused the command.
    let stuck = loop {
        let page = sagas_a.list(&query).await.unwrap();
        let backing_off = |i: &SagaInstance<Payment>| {
            i.timers
                .iter()
                .any(|t| matches!(t.kind, TimerKind::Backoff { .. }))
        };
        if let Some(inst) = page
            .items
            .into_iter()
            .find(|i| i.id == id && backing_off(i))
        {
            break inst;
        }
        assert!(Instant::now() < deadline, "the stuck saga is not listed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(stuck.status, SagaStatus::Running);
    assert_eq!(stuck.current_step(), Some("charge"));
    // Skipping a step that is not parked is refused at once.
    let err = sagas_a
        .operate(&id, Operation::skip("alice"))
        .await
        .unwrap_err();
    assert!(matches!(err, SagaError::InvalidAction { .. }), "{err:?}");

    bank.up.store(true, Ordering::SeqCst);
    sagas_a
        .operate(
            &id,
            Operation::retry("alice")
                .on_step("charge")
                .note("the bank is back"),
        )
        .await
        .unwrap();
    let done = sagas_a
        .wait_settled(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.status, SagaStatus::Completed, "{:?}", done.history);
    assert!(done.data.charged);
    let entry = done
        .history
        .iter()
        .find(|h| {
            h.what
                .contains("operator: retry step `charge` now (skips the backoff)")
        })
        .unwrap_or_else(|| panic!("{:?}", done.history));
    assert_eq!(entry.operator.as_deref(), Some("alice"));
    assert_eq!(entry.note.as_deref(), Some("the bank is back"));
}

/// The threads of this process whose name starts with `prefix` (Linux).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn the_catalogs_reader_stops_with_its_runtime_and_later_queries_are_shutdown() {
    let _serial = SERIAL.lock().await;
    let bed = TestBed::new().await;
    let name = bed.fx.topic("gone");
    let channel = bed.fx.topic("bank");
    let rt = bed.runtime("a");
    let sagas = rt.saga(payment_saga(&name, &channel)).await.unwrap();
    // Thread names are cut at 15 bytes: `saga-kafka-cata`. The readers of
    // the tests before this one stop at their next poll: wait for them.
    let prefix = "saga-kafka-cata";
    let deadline = Instant::now() + Duration::from_secs(15);
    while threads_named(prefix) > 0 {
        assert!(
            Instant::now() < deadline,
            "earlier tests' catalog readers still run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = 0;
    sagas.list(&SagaQuery::all()).await.unwrap();
    assert_eq!(
        threads_named(prefix),
        before + 1,
        "the first query starts it"
    );
    rt.shutdown().await;
    // The handle is still held; its reader stops within a poll.
    let deadline = Instant::now() + Duration::from_secs(10);
    while threads_named(prefix) > before {
        assert!(
            Instant::now() < deadline,
            "the catalog's reader outlives its runtime"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = sagas.list(&SagaQuery::all()).await.unwrap_err();
    assert!(matches!(err, SagaError::Shutdown), "{err:?}");
}
