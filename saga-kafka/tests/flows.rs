//! Sagas run to completion and through compensation on a real broker.

mod common;

use std::time::Duration;

use common::*;
use saga_core::{SagaStatus, StepState};
use saga_kafka::KafkaRuntime;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn saga_completes_and_another_compensates() {
    let ns = ns();
    let t = topics(&ns);
    let cfg = config(&ns, "a");
    create_event_topic(&cfg, &t).await;
    let rt = KafkaRuntime::new(cfg).unwrap();
    let (inventory, payments) = run_participants(&rt, &ns, &t).await;
    let orders = rt
        .saga(order_saga(&t, Duration::from_millis(100)))
        .await
        .unwrap();

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
    // A second start with the same id is refused.
    assert!(orders.start("order-ok", Order::new(1)).await.is_err());
    rt.shutdown().await;

    let events = read_committed(&t.events);
    let types = |id: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e.saga_id.as_str() == id)
            .map(|e| e.payload["type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(types("order-ok"), ["ORDER_CREATED", "ORDER_CONFIRMED"]);
    assert_eq!(
        types("order-declined"),
        ["ORDER_CREATED", "ORDER_CANCELLED"]
    );
    let commands = read_committed(&t.inventory);
    assert_eq!(commands.len(), 3, "reserve ×2 and one release");
    assert_eq!(inventory.max(), 1);
    assert_eq!(payments.max(), 1);
}
