//! An orchestrator stopped with sagas in flight, some waiting on backoff
//! timers: a new instance restores them from the state topic and finishes
//! them, timers firing at their persisted times.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use saga_core::driver::TimerKind;
use saga_core::testing::eventually;
use saga_core::{Runtime, SagaId, SagaInstance, SagaStatus, Timestamp};

/// When each saga's backoff timer fires, for the sagas that have one.
fn backoff_timers(sagas: &[SagaInstance<Order>]) -> HashMap<SagaId, Timestamp> {
    sagas
        .iter()
        .filter_map(|i| {
            let t = i
                .timers
                .iter()
                .find(|t| matches!(t.kind, TimerKind::Backoff { .. }))?;
            Some((i.id.clone(), t.fire_at))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn restarted_orchestrator_restores_sagas_and_fires_their_timers() {
    let bed = TestBed::new().await;
    let (participants, _inventory, payments) = bed.participants().await;

    let backoff = Duration::from_millis(1500);
    let first = bed.runtime("orchestrator-0");
    let orders = bed.orders(&first, backoff).await;
    let n = 20;
    // Far enough off for the straight-through half to settle first.
    let ready_at = Timestamp::now().as_millis() + 15_000;
    let mut ids = Vec::new();
    for i in 0..n {
        let mut order = Order::new(100 + i);
        // Half wait on backoff timers past the restart; half go straight through.
        if i % 2 == 0 {
            order.ready_at = ready_at;
        }
        ids.push(orders.start(format!("order-{i}"), order).await.unwrap());
    }
    // Wait until every waiting saga has its backoff timer armed.
    eventually(
        "every waiting saga's backoff timer armed",
        Duration::from_secs(30),
        || async { backoff_timers(&owned(&orders).await).len() == n as usize / 2 },
    )
    .await;
    // And until the others settled: some sagas settled before the restart.
    for id in ids.iter().skip(1).step_by(2) {
        orders
            .wait_settled(id, Duration::from_secs(30))
            .await
            .unwrap();
    }
    let stopped_at = owned(&orders).await;
    let armed = backoff_timers(&stopped_at);
    assert_eq!(armed.len(), n as usize / 2, "a waiting saga went on early");
    first.shutdown().await;

    let second = bed.runtime("orchestrator-0");
    let orders = bed.orders(&second, backoff).await;
    // The sagas settled before the restart are restored into the view
    // (their records are decoded once the restore ends), as they were:
    // a local list shows them without reading the state topic.
    let settled_before: Vec<&SagaInstance<Order>> =
        stopped_at.iter().filter(|i| i.status.is_final()).collect();
    assert_eq!(
        settled_before.len(),
        n as usize / 2,
        "half went straight through"
    );
    eventually(
        "the sagas settled before the restart in the new view",
        Duration::from_secs(30),
        || async {
            let now = owned(&orders).await;
            settled_before.iter().all(|s| {
                now.iter()
                    .any(|i| i.id == s.id && i.version == s.version && i.status == s.status)
            })
        },
    )
    .await;
    for id in &ids {
        let done = orders
            .wait_settled(id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            done.status,
            SagaStatus::Completed,
            "{id}: {:#?}",
            done.history
        );
        if let Some(fire_at) = armed.get(id) {
            let before = stopped_at.iter().find(|i| &i.id == id).unwrap();
            let after = &done.history[before.history.len()..];
            let first_new = after.first().expect("progress after the restart");
            assert!(
                first_new.at >= *fire_at,
                "{id}: timer due {fire_at} fired early at {}",
                first_new.at
            );
            assert!(done.step("wait").unwrap().attempts >= 2);
        }
    }
    second.shutdown().await;
    participants.shutdown().await;
    assert_eq!((payments.steps(), payments.max_per_step()), (n as usize, 1));
}
