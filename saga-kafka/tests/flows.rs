//! Sagas run to completion and through compensation on a real broker.

mod common;

use std::time::Duration;

use common::*;
use saga_core::{Runtime, SagaStatus, StepState};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn saga_completes_and_another_compensates() {
    let bed = TestBed::new().await;
    let t = &bed.t;
    let rt = bed.runtime("a");
    let (inventory, payments) = bed.run_participants(&rt).await;
    let orders = bed.orders(&rt, Duration::from_millis(100)).await;

    let ok = orders.start("order-ok", Order::new(500)).await.unwrap();
    let declined = orders
        .start("order-declined", Order::new(5000))
        .await
        .unwrap();
    let done = orders
        .wait_settled(&ok, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.status, SagaStatus::Completed, "{:#?}", done.history);
    assert!(done.data.reserved && done.data.paid);
    let comp = orders
        .wait_settled(&declined, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(comp.status, SagaStatus::Compensated, "{:#?}", comp.history);
    assert_eq!(comp.step("reserve").unwrap().state, StepState::Compensated);
    assert_eq!(comp.failure.as_deref(), Some("card declined"));
    // A second start of the same id (a settled saga) starts nothing.
    let again = orders.start("order-ok", Order::new(1)).await.unwrap();
    assert_eq!(again, ok);
    let kept = orders.get(&ok).await.unwrap().unwrap();
    assert_eq!(kept.status, SagaStatus::Completed);
    rt.shutdown().await;

    let events = bed.fx.read_committed(&t.events);
    assert_eq!(
        event_types(&events, "order-ok"),
        ["ORDER_CREATED", "ORDER_CONFIRMED"]
    );
    assert_eq!(
        event_types(&events, "order-declined"),
        ["ORDER_CREATED", "ORDER_CANCELLED"]
    );
    let commands = bed.fx.read_committed(&t.inventory);
    assert_eq!(commands.len(), 3, "reserve ×2 and one release");
    // Each step (reserve ×2, release; pay ×2) ran once.
    assert_eq!((inventory.steps(), inventory.max_per_step()), (3, 1));
    assert_eq!((payments.steps(), payments.max_per_step()), (2, 1));
}
