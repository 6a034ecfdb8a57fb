//! Engine behaviour on the pure core: bad input gives typed errors, never a
//! panic; the step kinds, timeouts, parking and operator actions.

use std::time::Duration;

use saga_core::testing::SagaHarness;
use saga_core::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Order {
    reserved: bool,
    cancelled: Option<String>,
    confirmed: bool,
}

#[derive(Serialize, Deserialize)]
struct Reserved {
    ok: bool,
}

fn order_saga() -> SagaDefinition<Order> {
    SagaDefinition::<Order>::builder("order")
        .step(
            Step::<Order>::local("create", |_| Ok(())).compensate_local(|ctx| {
                let reason = ctx.failure_reason().unwrap_or("?").to_owned();
                ctx.data_mut().cancelled = Some(reason);
                ctx.emit("orders.events", &"ORDER_CANCELLED");
                Ok(())
            }),
        )
        .step(
            Step::remote("reserve", "inventory.requests")
                .command(|_: &Order| "RESERVE")
                .on_reply(|ctx, r: Reserved| {
                    if r.ok {
                        ctx.data_mut().reserved = true;
                        Ok(())
                    } else {
                        Err(StepError::permanent("Not enough stock"))
                    }
                })
                .pivot()
                .timeout(Duration::from_secs(5))
                .retry(RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(2)),
        )
        .step(
            Step::<Order>::local("confirm", |ctx| {
                ctx.data_mut().confirmed = true;
                ctx.emit("orders.events", &"ORDER_CONFIRMED");
                Ok(())
            })
            .retriable(),
        )
        .build()
        .unwrap()
}

#[test]
fn definitions_with_no_steps_two_pivots_or_bad_order_are_typed_errors() {
    let empty = SagaDefinition::<()>::builder("empty").build();
    assert!(matches!(empty, Err(SagaError::EmptyDefinition { ref saga }) if saga == "empty"));

    let two = SagaDefinition::<()>::builder("two")
        .step(Step::<()>::local("a", |_| Ok(())).pivot())
        .step(Step::<()>::local("b", |_| Ok(())).pivot())
        .build();
    match two {
        Err(SagaError::MultiplePivots { first, second, .. }) => {
            assert_eq!((first.as_str(), second.as_str()), ("a", "b"))
        }
        other => panic!("expected MultiplePivots, got {other:?}"),
    }

    let order = SagaDefinition::<()>::builder("order")
        .step(Step::<()>::local("a", |_| Ok(())).pivot())
        .step(Step::<()>::local("b", |_| Ok(())))
        .build();
    let err = order.unwrap_err();
    assert!(matches!(err, SagaError::StepOrder { .. }));
    assert!(
        err.to_string()
            .contains("step `b` is compensatable but comes after the point of no return `a`"),
        "{err}"
    );

    let dup = SagaDefinition::<()>::builder("dup")
        .step(Step::<()>::local("a", |_| Ok(())))
        .step(Step::<()>::local("a", |_| Ok(())))
        .build();
    assert!(matches!(dup, Err(SagaError::DuplicateStep { .. })));

    let incomplete = SagaDefinition::<()>::builder("inc")
        .step(Step::remote("a", "ch"))
        .build();
    assert!(matches!(incomplete, Err(SagaError::IncompleteStep { ref step, .. }) if step == "a"));
}

#[test]
fn a_reply_of_the_wrong_type_is_a_decode_error_and_changes_nothing() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-1", Order::default()).unwrap();
    let before = t.instance().clone();
    let err = t.reply_ok("reserve", &"not an object").unwrap_err();
    match &err {
        SagaError::Decode {
            saga_id,
            step,
            what,
            ..
        } => {
            assert_eq!(
                (saga_id.as_str(), step.as_str(), *what),
                ("o-1", "reserve", "reply")
            );
        }
        other => panic!("expected Decode, got {other:?}"),
    }
    assert_eq!(
        t.instance(),
        &before,
        "a bad reply leaves the instance as it was"
    );
    // The right reply still works afterwards.
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    assert_eq!(t.status(), &SagaStatus::Completed);
}

#[test]
fn replies_for_another_saga_or_step_and_non_replies_are_typed_errors() {
    let def = order_saga();
    let t = def
        .start(SagaId::new("o-2"), Order::default(), Timestamp::EPOCH)
        .unwrap();
    let command = t
        .effects
        .iter()
        .find_map(|e| match e {
            Effect::Send(env) if env.kind == MessageKind::Command => Some(env.clone()),
            _ => None,
        })
        .unwrap();
    let reply = command
        .reply(
            ReplyOutcome::Success,
            serde_json::json!({"ok": true}),
            Timestamp::EPOCH,
        )
        .unwrap();

    let mut other = reply.clone();
    other.saga_id = SagaId::new("someone-else");
    assert!(matches!(
        def.handle(&t.instance, Input::Reply(other), Timestamp::EPOCH),
        Err(SagaError::WrongSaga { .. })
    ));

    let mut step = reply.clone();
    step.step = Some("no-such-step".into());
    assert!(matches!(
        def.handle(&t.instance, Input::Reply(step), Timestamp::EPOCH),
        Err(SagaError::UnknownStep { .. })
    ));

    let err = def
        .handle(&t.instance, Input::Reply(command), Timestamp::EPOCH)
        .unwrap_err();
    assert!(
        matches!(
            err,
            SagaError::WrongMessageKind {
                expected: "reply",
                found: "command",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_reply_for_an_unknown_saga_is_a_typed_error_on_the_runtime() {
    let runtime = InMemoryRuntime::new(MemoryBackend::new());
    let orders = runtime.saga(order_saga());
    let reply = Envelope {
        id: MessageId::new("ghost/reserve/forward/reply"),
        channel: "order.replies".into(),
        saga_id: SagaId::new("ghost"),
        saga: "order".into(),
        kind: MessageKind::Reply,
        step: Some("reserve".into()),
        phase: Some(Phase::Forward),
        attempt: 1,
        reply_to: None,
        outcome: Some(ReplyOutcome::Success),
        timestamp: Timestamp::EPOCH,
        payload: serde_json::json!({"ok": true}),
    };
    let err = orders.deliver(reply.clone()).unwrap_err();
    assert!(
        matches!(&err, SagaError::UnknownSaga { saga_id, .. } if saga_id.as_str() == "ghost"),
        "{err}"
    );
    assert!(err.to_string().contains("ghost"));

    // Sent over the channel instead, it is dead-lettered, not lost and not blocking.
    runtime.backend().publish(reply);
    orders.start("real", Order::default()).unwrap();
    let backend = runtime.backend().clone();
    tokio::time::timeout(Duration::from_secs(5), async {
        while backend.dead_letters("order.dlq").is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the unknown-saga reply is dead-lettered");
    let dead = &runtime.backend().dead_letters("order.dlq")[0];
    assert_eq!(dead.original.saga_id.as_str(), "ghost");
    assert!(
        dead.last_error.contains("no saga instance `ghost`"),
        "{}",
        dead.last_error
    );
    runtime.shutdown().await;
}

#[test]
fn operator_actions_on_a_running_saga_are_rejected() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-3", Order::default()).unwrap();
    let err = t.operator(OperatorAction::Retry).unwrap_err();
    assert!(matches!(err, SagaError::InvalidAction { .. }));
    assert!(err.to_string().contains("while running"), "{err}");
}

#[test]
fn success_path_runs_forward_in_order() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-4", Order::default()).unwrap();
    assert_eq!(t.commands().len(), 1);
    assert_eq!(t.commands()[0].channel, "inventory.requests");
    assert_eq!(t.commands()[0].id.as_str(), "o-4/reserve/forward");
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    assert_eq!(t.status(), &SagaStatus::Completed);
    assert!(t.data().reserved && t.data().confirmed);
    let events: Vec<_> = t.events().iter().map(|e| e.payload.clone()).collect();
    assert_eq!(events, vec![serde_json::json!("ORDER_CONFIRMED")]);
    assert!(
        t.instance().timers.is_empty(),
        "a finished saga keeps no timers"
    );
}

#[test]
fn a_refused_pivot_compensates_earlier_steps_with_the_reason() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-5", Order::default()).unwrap();
    t.reply_ok("reserve", &Reserved { ok: false }).unwrap();
    assert_eq!(t.status(), &SagaStatus::Compensated);
    assert_eq!(t.data().cancelled.as_deref(), Some("Not enough stock"));
    assert!(!t.data().confirmed);
    assert_eq!(t.events().len(), 1);
    assert_eq!(t.events()[0].payload, serde_json::json!("ORDER_CANCELLED"));
}

#[test]
fn duplicate_and_stale_replies_are_ignored() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-6", Order::default()).unwrap();
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    let events = t.events().len();
    assert_eq!(
        t.redeliver_last_reply().unwrap(),
        Handled::Ignored("no command is waiting for a reply")
    );
    assert_eq!(t.events().len(), events, "a duplicate reply has no effect");
}

#[test]
fn a_pivot_whose_outcome_is_unknown_parks_with_a_dead_letter_and_resumes_on_retry() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-7", Order::default()).unwrap();
    // Two attempts, both unanswered.
    t.advance(Duration::from_secs(5)).unwrap();
    t.advance(Duration::from_secs(1)).unwrap();
    t.advance(Duration::from_secs(5)).unwrap();
    let SagaStatus::Parked { reason } = t.status().clone() else {
        panic!("expected parked, got {:?}", t.status());
    };
    assert!(
        reason.contains("outcome of pivot step `reserve` unknown"),
        "{reason}"
    );
    let dead = &t.dead_letters()[0];
    assert_eq!(dead.channel, "order.dlq");
    assert_eq!(dead.retry_count, 2);
    assert_eq!(dead.original.id.as_str(), "o-7/reserve/forward");
    assert!(dead.last_error.contains("no reply within 5s"));
    assert!(
        t.data().cancelled.is_none(),
        "nothing is compensated while the pivot is unknown"
    );

    // The operator retries: same command id, fresh attempts.
    t.operator(OperatorAction::Retry).unwrap();
    assert_eq!(t.status(), &SagaStatus::Running);
    let last = (*t.commands().last().unwrap()).clone();
    assert_eq!(last.id.as_str(), "o-7/reserve/forward");
    assert_eq!(last.attempt, 1);
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    assert_eq!(t.status(), &SagaStatus::Completed);
}

#[test]
fn a_failing_compensation_parks_and_skip_finishes_it() {
    let saga = SagaDefinition::<()>::builder("pay")
        .step(
            Step::remote("hold", "bank")
                .command(|_: &()| "HOLD")
                .compensate_remote("bank", |_: &()| "RELEASE")
                .compensation_retry(
                    RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(2),
                ),
        )
        .step(Step::<()>::local("check", |_| Err(StepError::permanent("fraud"))).pivot())
        .build()
        .unwrap();
    let mut t = SagaHarness::new(saga);
    t.start("p-1", ()).unwrap();
    t.reply_ok("hold", &"held").unwrap();
    assert_eq!(t.status(), &SagaStatus::Compensating);
    t.reply_failure("hold", ErrorClass::Retryable, "bank down")
        .unwrap();
    t.advance(Duration::from_secs(1)).unwrap();
    t.reply_failure("hold", ErrorClass::Retryable, "bank still down")
        .unwrap();
    let SagaStatus::Parked { reason } = t.status().clone() else {
        panic!("{:?}", t.status())
    };
    assert!(
        reason.contains("compensation of step `hold` failed"),
        "{reason}"
    );
    let dead = t.dead_letters().last().unwrap();
    assert_eq!(dead.original.phase, Some(Phase::Compensation));
    assert_eq!(dead.last_error, "bank still down");
    t.operator(OperatorAction::Skip).unwrap();
    assert_eq!(t.status(), &SagaStatus::Compensated);
}

#[test]
fn saga_timeout_before_the_pivot_compensates() {
    let saga = SagaDefinition::<Order>::builder("slow")
        .step(
            Step::<Order>::local("create", |_| Ok(())).compensate_local(|ctx| {
                ctx.data_mut().cancelled = ctx.failure_reason().map(str::to_owned);
                Ok(())
            }),
        )
        .step(Step::remote("wait", "svc").command(|_: &Order| "X").pivot())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut t = SagaHarness::new(saga);
    t.start("s-1", Order::default()).unwrap();
    t.advance(Duration::from_secs(30)).unwrap();
    // The pivot was in flight: its outcome is unknown, so the saga parks.
    assert!(
        matches!(t.status(), SagaStatus::Parked { .. }),
        "{:?}",
        t.status()
    );
}

#[test]
fn crash_and_restart_between_inputs_changes_nothing() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-8", Order::default()).unwrap();
    t.restart().unwrap();
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    t.restart().unwrap();
    assert_eq!(t.status(), &SagaStatus::Completed);
}

#[test]
fn hooks_run_once_at_the_end_and_send_fire_and_forget_commands() {
    let saga = SagaDefinition::<Order>::builder("hooked")
        .step(
            Step::remote("reserve", "inventory.requests")
                .command(|_: &Order| "RESERVE")
                .on_reply(|_, r: Reserved| {
                    if r.ok {
                        Ok(())
                    } else {
                        Err(StepError::permanent("Not enough stock"))
                    }
                }),
        )
        .on_completed(|ctx| {
            ctx.data_mut().confirmed = true;
            ctx.send("notifications.requests", &"ORDER_CONFIRMED");
        })
        .on_compensated(|ctx| {
            let reason = ctx.failure_reason().map(str::to_owned);
            ctx.data_mut().cancelled = reason;
            ctx.emit("orders.events", &"ORDER_CANCELLED");
            ctx.send("notifications.requests", &"ORDER_CANCELLED");
        })
        .build()
        .unwrap();

    let mut ok = SagaHarness::new(saga.clone());
    ok.start("h-1", Order::default()).unwrap();
    ok.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    assert!(ok.data().confirmed);
    let sent = ok.commands();
    assert_eq!(sent.len(), 2);
    let notice = sent[1];
    assert_eq!(notice.channel, "notifications.requests");
    assert_eq!(notice.reply_to, None, "fire-and-forget: no reply expected");
    assert_eq!(notice.id.as_str(), "h-1/command/1");
    assert!(ok.instance().awaiting.is_none());

    let mut ko = SagaHarness::new(saga);
    ko.start("h-2", Order::default()).unwrap();
    ko.reply_ok("reserve", &Reserved { ok: false }).unwrap();
    assert_eq!(ko.status(), &SagaStatus::Compensated);
    assert_eq!(ko.data().cancelled.as_deref(), Some("Not enough stock"));
    assert_eq!(ko.events().len(), 1);
    assert_eq!(ko.commands().len(), 2);
    // A duplicate reply after the end runs no hook again.
    ko.redeliver_last_reply().unwrap();
    assert_eq!(ko.commands().len(), 2);
}
