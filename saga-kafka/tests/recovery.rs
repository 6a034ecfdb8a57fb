//! An orchestrator stopped with sagas in flight, some waiting on backoff
//! timers: a new instance restores them from the state topic and finishes
//! them, timers firing at their persisted times.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use saga_core::{ParticipantPolicy, SagaId, SagaStatus, TimerKind, Timestamp};
use saga_kafka::KafkaRuntime;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn restarted_orchestrator_restores_sagas_and_fires_their_timers() {
    let ns = ns();
    let t = topics(&ns);
    let cfg = config(&ns, "orchestrator-0");
    create_event_topic(&cfg, &t).await;
    let participants = KafkaRuntime::new(config(&ns, "participants-0")).unwrap();
    let payments = Applied::default();
    participants
        .participant(
            &t.inventory,
            ParticipantPolicy::new(format!("{ns}-inventory")),
            Inventory(Applied::default()),
        )
        .await
        .unwrap();
    participants
        .participant(
            &t.payments,
            ParticipantPolicy::new(format!("{ns}-payments")),
            Payments(payments.clone()),
        )
        .await
        .unwrap();

    let backoff = Duration::from_millis(1500);
    let first = KafkaRuntime::new(cfg.clone()).unwrap();
    let orders = first.saga(order_saga(&t, backoff)).await.unwrap();
    let n = 20;
    let ready_at = Timestamp::now().as_millis() + 5_000;
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
    let deadline = Instant::now() + Duration::from_secs(30);
    let armed: HashMap<SagaId, Timestamp> = loop {
        let armed: HashMap<SagaId, Timestamp> = orders
            .owned()
            .into_iter()
            .filter_map(|i| {
                let t = i
                    .timers
                    .iter()
                    .find(|t| matches!(t.kind, TimerKind::Backoff { .. }))?;
                Some((i.id.clone(), t.fire_at))
            })
            .collect();
        if armed.len() == n as usize / 2 {
            break armed;
        }
        assert!(
            Instant::now() < deadline,
            "only {} backoff timers armed",
            armed.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stopped_at = orders.owned();
    first.shutdown().await;

    let second = KafkaRuntime::new(cfg).unwrap();
    let orders = second.saga(order_saga(&t, backoff)).await.unwrap();
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
    assert_eq!(payments.len(), n as usize);
    assert_eq!(payments.max(), 1);
}
