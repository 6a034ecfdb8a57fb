//! Engine behaviour on the pure core: bad input gives typed errors, never a
//! panic; the step kinds, timeouts, parking and operator actions.

use std::time::Duration;

use saga_core::driver::{Effect, Handled, Ignored, Input, TimerKind};
use saga_core::testing::{eventually, SagaHarness};
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

/// `reserve` on `inventory.requests`: `{"ok": true}` reserves, anything
/// else fails with `refusal()`.
fn reserve_step(refusal: fn() -> StepError) -> Step<Order> {
    Step::remote("reserve", "inventory.requests")
        .command(|_: &Order| "RESERVE")
        .on_reply(move |ctx, r: Reserved| {
            if r.ok {
                ctx.data_mut().reserved = true;
                Ok(())
            } else {
                Err(refusal())
            }
        })
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
            reserve_step(|| StepError::permanent("Not enough stock"))
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
            .retryable(),
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

    let continuing = SagaDefinition::<()>::builder("cont")
        .step(Step::<()>::local("a", |_| Ok(())).on_exhausted(Exhausted::DeadLetterAndContinue))
        .build();
    match continuing {
        Err(SagaError::InvalidStep { step, reason, .. }) => {
            assert_eq!(step, "a");
            assert!(reason.contains("only a retryable step"), "{reason}");
        }
        other => panic!("expected InvalidStep, got {other:?}"),
    }
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
fn a_saga_recorded_with_other_steps_than_its_definition_is_refused_not_a_panic() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-1", Order::default()).unwrap();
    let instance = t.instance().clone();
    let deadline = instance.timers[0].id.clone();
    let now = instance.updated_at;
    // A later deployment dropped the last two steps.
    let fewer = SagaDefinition::<Order>::builder("order")
        .step(Step::<Order>::local("create", |_| Ok(())))
        .build()
        .unwrap();
    // Another renamed the second.
    let renamed = SagaDefinition::<Order>::builder("order")
        .step(Step::<Order>::local("create", |_| Ok(())))
        .step(
            Step::remote("reserve-stock", "inventory.requests")
                .command(|_: &Order| "RESERVE")
                .on_reply(|_, _: Reserved| Ok(())),
        )
        .step(Step::<Order>::local("confirm", |_| Ok(())))
        .build()
        .unwrap();
    for (def, why) in [
        (&fewer, "recorded with 3 steps, the definition has 1"),
        (
            &renamed,
            "its step 2 is `reserve`, the definition's is `reserve-stock`",
        ),
    ] {
        match def.handle(&instance, Input::Timer(deadline.clone()), now) {
            Err(SagaError::DefinitionMismatch { saga_id, reason }) => {
                assert_eq!(saga_id.as_str(), "o-1");
                assert!(reason.contains(why), "{reason}");
            }
            other => panic!("expected DefinitionMismatch, got {other:?}"),
        }
    }
    // The definition it was recorded with still handles it.
    assert!(order_saga()
        .handle(&instance, Input::Timer(deadline), now)
        .is_ok());
}

#[test]
fn a_panic_in_the_sagas_code_is_an_error_and_leaves_the_instance_as_it_was() {
    let def = SagaDefinition::<Order>::builder("order")
        .step(
            Step::remote("reserve", "inventory.requests")
                .command(|_: &Order| "RESERVE")
                .on_reply(|_, r: Reserved| {
                    assert!(r.ok, "a reply it cannot take");
                    Ok(())
                }),
        )
        .build()
        .unwrap();
    let mut t = SagaHarness::new(def);
    t.start("o-1", Order::default()).unwrap();
    let before = t.instance().clone();
    match t.reply_ok("reserve", &Reserved { ok: false }) {
        Err(SagaError::Panicked { saga_id, message }) => {
            assert_eq!(saga_id.as_str(), "o-1");
            assert!(message.contains("a reply it cannot take"), "{message}");
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert_eq!(t.instance(), &before, "nothing changed");
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    assert_eq!(t.status(), &SagaStatus::Completed);

    // A start whose first step panics is refused.
    let def = SagaDefinition::<Order>::builder("order")
        .step(Step::<Order>::local("create", |_| {
            panic!("no orders today")
        }))
        .build()
        .unwrap();
    match def.start(
        SagaId::new("o-2"),
        Order::default(),
        Timestamp::from_millis(1),
    ) {
        Err(SagaError::Panicked { message, .. }) => assert_eq!(message, "no orders today"),
        other => panic!("expected Panicked, got {:?}", other.map(|t| t.instance)),
    }
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
async fn a_reply_for_an_unknown_saga_is_dead_lettered_and_does_not_block() {
    let runtime = InMemoryRuntime::new(MemoryBackend::new());
    let orders = runtime.saga(order_saga()).await.unwrap();
    let mut reply = Envelope::event(
        MessageId::new("ghost/reserve/forward/1/reply"),
        "order.replies",
        SagaId::new("ghost"),
        "order",
        serde_json::json!({"ok": true}),
        Timestamp::EPOCH,
    );
    reply.kind = MessageKind::Reply;
    reply.step = Some("reserve".into());
    reply.phase = Some(Phase::Forward);
    reply.attempt = 1;
    reply.outcome = Some(ReplyOutcome::Success);
    runtime.backend().publish(reply);
    let id = orders.start("real", Order::default()).await.unwrap();
    let backend = runtime.backend().clone();
    eventually(
        "the unknown-saga reply dead-lettered",
        Duration::from_secs(5),
        || {
            let n = backend.dead_letters("order.dlq").len();
            async move { n == 1 }
        },
    )
    .await;
    let dead = &runtime.backend().dead_letters("order.dlq")[0];
    assert_eq!(dead.original.saga_id.as_str(), "ghost");
    assert!(
        dead.last_error.contains("no saga instance `ghost`"),
        "{}",
        dead.last_error
    );
    // The saga after it on the same channel was served.
    assert!(orders.get(&id).await.unwrap().is_some());
    runtime.shutdown().await;
}

#[test]
fn operator_actions_on_a_settled_saga_and_skips_of_a_stuck_one_are_rejected() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-3", Order::default()).unwrap();
    // Waiting on the pivot's reply: a skip would race that reply.
    let err = t.operator(Operation::skip("alice")).unwrap_err();
    assert!(matches!(err, SagaError::InvalidAction { .. }));
    assert!(
        err.to_string()
            .contains("while running on step `reserve`, not parked"),
        "{err}"
    );
    // Nor is a stuck pivot aborted: its reply or deadline decides.
    let err = t.operator(Operation::abort("alice")).unwrap_err();
    assert!(err.to_string().contains("not parked"), "{err}");
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    t.then_status(&SagaStatus::Completed);
    for op in [
        Operation::retry("alice"),
        Operation::skip("alice"),
        Operation::abort("alice"),
    ] {
        let err = t.operator(op).unwrap_err();
        assert!(err.to_string().contains("while completed"), "{err}");
    }
}

/// `reserve`, compensatable and with no attempt timeout (a lost reply
/// leaves it waiting for good), after a local `create`; retries back off
/// for an hour.
fn stuck_saga() -> SagaDefinition<Order> {
    SagaDefinition::<Order>::builder("stuck")
        .step(
            Step::<Order>::local("create", |_| Ok(())).compensate_local(|ctx| {
                let reason = ctx.failure_reason().unwrap_or("?").to_owned();
                ctx.data_mut().cancelled = Some(reason);
                Ok(())
            }),
        )
        .step(
            reserve_step(|| StepError::retryable("inventory busy"))
                .retry(RetryPolicy::fixed(Duration::from_secs(3600)).with_max_attempts(3))
                .compensate_remote("inventory.requests", |_: &Order| "RELEASE"),
        )
        .build()
        .unwrap()
}

#[test]
fn an_operators_retry_of_a_step_in_its_backoff_sends_the_next_attempt_now() {
    let mut t = SagaHarness::new(stuck_saga());
    t.start("s-1", Order::default()).unwrap();
    t.reply_ok("reserve", &Reserved { ok: false }).unwrap();
    assert_eq!(t.commands().len(), 1, "waiting out an hour's backoff");
    assert!(!t.status().is_parked());
    t.operator(
        Operation::retry("alice")
            .on_step("reserve")
            .note("inventory is back"),
    )
    .unwrap();
    let ids: Vec<String> = t.commands().iter().map(|c| c.id.to_string()).collect();
    assert_eq!(
        ids,
        ["stuck:s-1/reserve/forward/1", "stuck:s-1/reserve/forward/2"]
    );
    assert!(
        !t.instance()
            .timers
            .iter()
            .any(|tm| matches!(tm.kind, TimerKind::Backoff { .. })),
        "the backoff is disarmed: {:?}",
        t.instance().timers
    );
    assert_eq!(t.instance().steps[1].attempts, 1, "a fresh retry budget");
    let entry = t
        .instance()
        .history
        .iter()
        .find(|h| {
            h.what
                .contains("operator: retry step `reserve` now (skips the backoff)")
        })
        .unwrap();
    assert_eq!(entry.operator.as_deref(), Some("alice"));
    assert_eq!(entry.note.as_deref(), Some("inventory is back"));
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    t.then_status(&SagaStatus::Completed);
    // The hour passes: nothing more is sent.
    t.advance(Duration::from_secs(3600)).unwrap();
    assert_eq!(t.commands().len(), 2);
}

#[test]
fn the_same_retry_now_sent_twice_with_the_version_seen_is_applied_once() {
    let mut t = SagaHarness::new(stuck_saga());
    t.start("s-twice", Order::default()).unwrap();
    let seen = t.instance().version;
    let op = Operation::retry("bob").on_step("reserve").at_version(seen);
    t.operator(op.clone()).unwrap();
    assert_eq!(t.commands().len(), 2);
    // A double click: the saga moved on to version seen + 1.
    let err = t.operator(op).unwrap_err();
    assert!(matches!(err, SagaError::InvalidAction { .. }), "{err:?}");
    assert!(err.to_string().contains("it changed since"), "{err}");
    assert_eq!(t.commands().len(), 2, "the second command is not abandoned");
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    t.then_status(&SagaStatus::Completed);
}

#[test]
fn an_operators_retry_of_an_unanswered_command_resends_and_a_late_answer_still_counts() {
    let mut t = SagaHarness::new(stuck_saga());
    t.start("s-2", Order::default()).unwrap();
    // Its reply was lost: with no attempt timeout, nothing would move.
    t.operator(Operation::retry("bob")).unwrap();
    assert_eq!(t.commands().len(), 2);
    assert_eq!(
        t.commands()[1].id.as_str(),
        "stuck:s-2/reserve/forward/2",
        "a new command, so the participant runs it again"
    );
    assert!(
        t.instance().steps[1].uncertain,
        "command 1 may have applied"
    );
    assert!(t.instance().history.iter().any(|h| h
        .what
        .contains("operator: retry step `reserve` now (abandons command 1, still unanswered)")));
    // The first command's answer arrives after all: it counts.
    let handled = t
        .reply_to_attempt("reserve", 1, &Reserved { ok: true })
        .unwrap();
    assert_eq!(handled, Handled::Applied);
    t.then_status(&SagaStatus::Completed);
}

#[test]
fn an_operators_abort_of_a_stuck_step_compensates_it_as_possibly_applied() {
    let mut t = SagaHarness::new(stuck_saga());
    t.start("s-3", Order::default()).unwrap();
    t.operator(Operation::abort("carol").note("customer cancelled by phone"))
        .unwrap();
    assert_eq!(t.status(), &SagaStatus::Compensating);
    let last = (*t.commands().last().unwrap()).clone();
    assert_eq!(
        last.phase,
        Some(Phase::Compensation),
        "the unanswered reserve may have applied: it is released"
    );
    t.reply_ok("reserve", &"released").unwrap();
    t.then_status(&SagaStatus::Compensated);
    assert_eq!(
        t.data().cancelled.as_deref(),
        Some("aborted by carol: customer cancelled by phone")
    );
}

#[test]
fn an_operators_retry_of_a_compensation_in_its_backoff_sends_it_now() {
    let saga = SagaDefinition::<Order>::builder("undo")
        .step(
            reserve_step(|| StepError::permanent("no"))
                .compensate_remote("inventory.requests", |_: &Order| "RELEASE")
                .compensation_retry(RetryPolicy::fixed(Duration::from_secs(3600))),
        )
        .step(Step::<Order>::local("fail", |_| {
            Err(StepError::permanent("card declined"))
        }))
        .build()
        .unwrap();
    let mut t = SagaHarness::new(saga);
    t.start("u-1", Order::default()).unwrap();
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    assert_eq!(t.status(), &SagaStatus::Compensating);
    t.reply_failure("reserve", ErrorClass::Retryable, "inventory down")
        .unwrap();
    let sent = t.commands().len();
    t.operator(Operation::retry("dave")).unwrap();
    assert_eq!(t.commands().len(), sent + 1, "the compensation is sent now");
    assert!(t.instance().history.iter().any(|h| h
        .what
        .contains("operator: retry compensation of step `reserve` now (skips the backoff)")));
    t.reply_ok("reserve", &"released").unwrap();
    t.then_status(&SagaStatus::Compensated);
}

#[test]
fn success_path_runs_forward_in_order() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-4", Order::default()).unwrap();
    assert_eq!(t.commands().len(), 1);
    assert_eq!(t.commands()[0].channel, "inventory.requests");
    assert_eq!(t.commands()[0].id.as_str(), "order:o-4/reserve/forward/1");
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
fn a_dead_letter_carries_the_awaited_command_or_a_stand_in_when_it_does_not_decode() {
    let def = order_saga();
    let now = Timestamp::from_millis(1_000);
    // Runs the instance's timers until it parks; `odd` replaces the
    // awaited command first with JSON that is not an envelope (as a state
    // record written elsewhere could hold).
    let park = |odd: bool| {
        let mut inst = def
            .start(SagaId::new("o-8"), Order::default(), now)
            .unwrap()
            .instance;
        for _ in 0..10 {
            if let (true, Some(a)) = (odd, inst.awaiting.as_mut()) {
                a.command = serde_json::from_str(r#"{"timestamp": 1000}"#).unwrap();
            }
            let timer = inst.next_timer().expect("a timer until it parks").clone();
            let t = def
                .handle(&inst, Input::Timer(timer.id), timer.fire_at)
                .unwrap();
            for effect in t.effects {
                if let Effect::DeadLetter(dead) = effect {
                    return dead;
                }
            }
            inst = t.instance;
        }
        panic!("never parked");
    };
    let sent = park(false);
    assert_eq!(sent.original.id.as_str(), "order:o-8/reserve/forward/2");
    assert_eq!(sent.original.channel, "inventory.requests");
    assert_eq!(sent.original.payload, serde_json::json!("RESERVE"));
    let stand_in = park(true);
    assert_eq!(stand_in.original.channel, "order.local");
    assert_eq!(stand_in.original.step.as_deref(), Some("reserve"));
    assert_eq!(stand_in.retry_count, sent.retry_count);
}

#[test]
fn duplicate_and_stale_replies_are_ignored() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-6", Order::default()).unwrap();
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    let events = t.events().len();
    assert_eq!(
        t.redeliver_last_reply().unwrap(),
        Handled::Ignored(Ignored::NothingAwaited)
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
    assert_eq!(t.dead_letters().len(), 1);
    let dead = &t.dead_letters()[0];
    assert_eq!(dead.channel, "order.dlq");
    assert_eq!(dead.retry_count, 2);
    assert_eq!(dead.original.id.as_str(), "order:o-7/reserve/forward/2");
    assert!(dead.last_error.contains("no reply within 5s"));
    assert!(
        t.data().cancelled.is_none(),
        "nothing is compensated while the pivot is unknown"
    );

    // The operator retries: a new command (the participant runs it again),
    // a fresh budget, recorded with who and why.
    t.operator(Operation::retry("alice").note("inventory is back"))
        .unwrap();
    t.then_status(&SagaStatus::Running);
    let last = (*t.commands().last().unwrap()).clone();
    assert_eq!(last.id.as_str(), "order:o-7/reserve/forward/3");
    assert_eq!(t.instance().steps[1].attempts, 1, "a fresh retry budget");
    let entry = t
        .instance()
        .history
        .iter()
        .find(|h| h.what.contains("operator: retry"))
        .unwrap();
    assert_eq!(entry.operator.as_deref(), Some("alice"));
    assert_eq!(entry.note.as_deref(), Some("inventory is back"));
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    t.then_status(&SagaStatus::Completed);
}

#[test]
fn an_operators_abort_of_a_parked_pivot_compensates_and_records_who_and_why() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-abort", Order::default()).unwrap();
    t.advance(Duration::from_secs(11)).unwrap();
    assert!(t.status().is_parked(), "{:?}", t.status());
    t.operator(Operation::abort("alice").note("the warehouse never got it"))
        .unwrap();
    t.then_status(&SagaStatus::Compensated);
    assert_eq!(
        t.data().cancelled.as_deref(),
        Some("aborted by alice: the warehouse never got it")
    );
    let entry = t
        .instance()
        .history
        .iter()
        .find(|h| h.what.contains("operator: abort"))
        .unwrap();
    assert_eq!(entry.operator.as_deref(), Some("alice"));
    assert_eq!(entry.note.as_deref(), Some("the warehouse never got it"));
    // A late reply to the abandoned attempt changes nothing.
    let handled = t
        .reply_to_attempt("reserve", 1, &Reserved { ok: true })
        .unwrap();
    assert!(matches!(handled, Handled::Ignored(_)), "{handled:?}");
    t.then_status(&SagaStatus::Compensated);
}

#[test]
fn an_abort_past_the_point_of_no_return_is_refused() {
    let saga = SagaDefinition::<Order>::builder("late")
        .step(reserve_step(|| StepError::permanent("no")).pivot())
        .step(
            Step::<Order>::local("confirm", |_| Err(StepError::permanent("down")))
                .retryable()
                .retry(RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(1)),
        )
        .build()
        .unwrap();
    let mut t = SagaHarness::new(saga);
    t.start("l-1", Order::default()).unwrap();
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    assert!(t.status().is_parked(), "{:?}", t.status());
    let err = t.operator(Operation::abort("bob")).unwrap_err();
    assert!(matches!(err, SagaError::InvalidAction { .. }), "{err:?}");
    assert!(err.to_string().contains("point of no return"), "{err}");
    assert!(t.status().is_parked());
}

#[test]
fn a_late_reply_resumes_a_parked_pivot() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-late", Order::default()).unwrap();
    t.advance(Duration::from_secs(11)).unwrap();
    assert!(t.status().is_parked(), "{:?}", t.status());
    // The first attempt's answer arrives at last: it took effect.
    let handled = t
        .reply_to_attempt("reserve", 1, &Reserved { ok: true })
        .unwrap();
    assert_eq!(handled, Handled::Applied);
    t.then_status(&SagaStatus::Completed);
    assert!(t.data().reserved && t.data().confirmed);
    assert!(t.instance().history.iter().any(|h| h
        .what
        .contains("late reply to command 1 resumes the parked saga")));
}

#[test]
fn a_late_permanent_failure_of_a_parked_pivot_compensates() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-late-2", Order::default()).unwrap();
    t.advance(Duration::from_secs(11)).unwrap();
    assert!(t.status().is_parked(), "{:?}", t.status());
    t.reply_failure("reserve", ErrorClass::Permanent, "Unknown SKU")
        .unwrap();
    t.then_status(&SagaStatus::Compensated);
    assert_eq!(t.data().cancelled.as_deref(), Some("Unknown SKU"));
}

#[test]
fn a_step_whose_earlier_attempt_went_unanswered_is_compensated_even_if_the_last_failed_for_good() {
    let saga = SagaDefinition::<Order>::builder("unsure")
        .step(
            reserve_step(|| StepError::permanent("Unknown SKU"))
                .timeout(Duration::from_secs(5))
                .retry(RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(2))
                .compensate_remote("inventory.requests", |_: &Order| "RELEASE"),
        )
        .build()
        .unwrap();
    let mut t = SagaHarness::new(saga);
    t.start("u-1", Order::default()).unwrap();
    // Attempt 1 goes unanswered: on a transport that reorders, it may still
    // arrive and apply after attempt 2 is refused.
    t.advance(Duration::from_secs(5)).unwrap();
    t.advance(Duration::from_secs(1)).unwrap();
    t.reply_failure("reserve", ErrorClass::Permanent, "Unknown SKU")
        .unwrap();
    assert_eq!(t.instance().steps[0].state, StepState::Compensating);
    let last = (*t.commands().last().unwrap()).clone();
    assert_eq!(last.phase, Some(Phase::Compensation), "{last:?}");
    t.reply_ok("reserve", &"released").unwrap();
    t.then_status(&SagaStatus::Compensated);
}

#[test]
fn a_retryable_reply_is_retried_with_a_new_command_and_the_participants_reason_is_kept() {
    let saga = SagaDefinition::<Order>::builder("busy")
        .step(
            reserve_step(|| StepError::retryable("inventory busy"))
                .retry(RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(2))
                .timeout(Duration::from_secs(5)),
        )
        .build()
        .unwrap();
    let mut t = SagaHarness::new(saga.clone());
    t.start("b-1", Order::default()).unwrap();
    t.reply_ok("reserve", &Reserved { ok: false }).unwrap();
    t.advance(Duration::from_secs(1)).unwrap();
    let ids: Vec<String> = t.commands().iter().map(|c| c.id.to_string()).collect();
    assert_eq!(
        ids,
        ["busy:b-1/reserve/forward/1", "busy:b-1/reserve/forward/2"]
    );
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    t.then_status(&SagaStatus::Completed);

    // Busy every time: the saga compensates with the participant's reason,
    // not a timeout.
    let mut t = SagaHarness::new(saga);
    t.start("b-2", Order::default()).unwrap();
    t.reply_ok("reserve", &Reserved { ok: false }).unwrap();
    t.advance(Duration::from_secs(1)).unwrap();
    t.reply_ok("reserve", &Reserved { ok: false }).unwrap();
    t.then_status(&SagaStatus::Compensated);
    assert_eq!(
        t.instance().steps[0].last_error.as_deref(),
        Some("inventory busy")
    );
}

#[test]
fn a_retryable_failure_reply_follows_the_steps_retry_policy() {
    let saga = SagaDefinition::<Order>::builder("four")
        .step(
            Step::remote("charge", "payments")
                .command(|_: &Order| "CHARGE")
                .retry(RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(4))
                .pivot(),
        )
        .build()
        .unwrap();
    let mut t = SagaHarness::new(saga);
    t.start("f-1", Order::default()).unwrap();
    for _ in 0..3 {
        t.reply_failure("charge", ErrorClass::Retryable, "503")
            .unwrap();
        t.advance(Duration::from_secs(1)).unwrap();
    }
    assert_eq!(t.commands().len(), 4, "four attempts, one command each");
    t.reply_ok("charge", &"charged").unwrap();
    t.then_status(&SagaStatus::Completed);
}

#[test]
fn a_success_to_an_earlier_attempt_during_the_backoff_completes_the_step() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-early", Order::default()).unwrap();
    t.advance(Duration::from_secs(5)).unwrap(); // attempt 1 times out; backoff 1 s
    assert_eq!(t.commands().len(), 1);
    t.reply_to_attempt("reserve", 1, &Reserved { ok: true })
        .unwrap();
    t.then_status(&SagaStatus::Completed);
    t.advance(Duration::from_secs(10)).unwrap();
    assert_eq!(t.commands().len(), 1, "no second attempt after the success");
}

#[test]
fn a_retryable_step_that_gives_up_dead_letters_once_and_the_saga_goes_on() {
    #[derive(Clone, Debug, Default, Serialize, Deserialize)]
    struct Mail {
        outcome: Option<String>,
    }
    let saga = SagaDefinition::<Mail>::builder("mail")
        .step(Step::<Mail>::local("confirm", |_| Ok(())).pivot())
        .step(
            Step::remote("notify", "notifications.requests")
                .command(|_: &Mail| "MAIL")
                .retry(RetryPolicy::exponential(Duration::from_secs(2), 2.0).with_max_attempts(3))
                .timeout(Duration::from_secs(5))
                .retryable()
                .on_exhausted(Exhausted::DeadLetterAndContinue)
                .dead_letter_channel("notifications.dlq")
                .on_give_up(|ctx, failure| {
                    ctx.data_mut().outcome = Some(format!(
                        "FAILED after {}: {}",
                        failure.attempts, failure.error
                    ));
                    ctx.emit("notifications.events", &"NOTIFICATION_FAILED");
                }),
        )
        .step(Step::<Mail>::local("archive", |_| Ok(())).retryable())
        .build()
        .unwrap();
    let mut t = SagaHarness::new(saga);
    t.start("m-1", Mail::default()).unwrap();
    t.advance(Duration::from_secs(5)).unwrap();
    t.advance(Duration::from_secs(2)).unwrap();
    t.reply_failure("notify", ErrorClass::Retryable, "503")
        .unwrap();
    t.advance(Duration::from_secs(4)).unwrap();
    t.reply_failure("notify", ErrorClass::Retryable, "500")
        .unwrap();
    t.then_status(&SagaStatus::Completed);
    assert_eq!(t.dead_letters().len(), 1);
    let dead = &t.dead_letters()[0];
    assert_eq!(dead.channel, "notifications.dlq");
    assert_eq!(dead.retry_count, 3);
    assert_eq!(dead.last_error, "500");
    assert!(dead.reason.contains("max retries"), "{}", dead.reason);
    assert_eq!(t.data().outcome.as_deref(), Some("FAILED after 3: 500"));
    t.then_expect_events(&[(
        "notifications.events",
        serde_json::json!("NOTIFICATION_FAILED"),
    )]);
    assert_eq!(
        t.instance().step("notify").unwrap().state,
        StepState::Failed
    );
    assert_eq!(
        t.instance().step("archive").unwrap().state,
        StepState::Succeeded
    );
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
    t.operator(Operation::skip("bob").note("released by hand"))
        .unwrap();
    t.then_status(&SagaStatus::Compensated);
}

fn slow_saga() -> SagaDefinition<Order> {
    SagaDefinition::<Order>::builder("slow")
        .step(
            Step::<Order>::local("create", |_| Ok(())).compensate_local(|ctx| {
                ctx.data_mut().cancelled = ctx.failure_reason().map(str::to_owned);
                Ok(())
            }),
        )
        .step(
            Step::remote("hold", "svc")
                .command(|_: &Order| "HOLD")
                .compensate_remote("svc", |_: &Order| "RELEASE"),
        )
        .step(Step::remote("wait", "svc").command(|_: &Order| "X").pivot())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[test]
fn saga_timeout_before_the_pivot_compensates() {
    let mut t = SagaHarness::new(slow_saga());
    t.start("s-1", Order::default()).unwrap();
    // `hold` never answers: the saga times out before its pivot.
    t.advance(Duration::from_secs(30)).unwrap();
    t.then_status(&SagaStatus::Compensating);
    // `hold` may have taken effect: its compensation is sent.
    assert_eq!(
        t.commands().last().unwrap().payload,
        serde_json::json!("RELEASE")
    );
    t.reply_ok("hold", &"released").unwrap();
    t.then_status(&SagaStatus::Compensated);
    assert_eq!(t.data().cancelled.as_deref(), Some("saga timed out"));
}

#[test]
fn saga_timeout_with_the_pivot_in_flight_parks() {
    let mut t = SagaHarness::new(slow_saga());
    t.start("s-2", Order::default()).unwrap();
    t.reply_ok("hold", &"held").unwrap();
    t.advance(Duration::from_secs(30)).unwrap();
    // The pivot was in flight: its outcome is unknown, so the saga parks
    // and nothing is compensated.
    let SagaStatus::Parked { reason } = t.status().clone() else {
        panic!("expected parked, got {:?}", t.status());
    };
    assert!(
        reason.contains("pivot step `wait` was in flight"),
        "{reason}"
    );
    assert!(t.data().cancelled.is_none());
}

#[test]
fn restart_round_trips_the_instance_and_the_saga_ends_as_without_it() {
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    struct Scratch {
        kept: u32,
        #[serde(skip)]
        lost: u32,
    }
    let saga = || {
        SagaDefinition::<Scratch>::builder("scratch")
            .step(Step::<Scratch>::local("count", |ctx| {
                ctx.data_mut().kept += 1;
                ctx.data_mut().lost += 1;
                Ok(())
            }))
            .step(
                Step::remote("call", "svc")
                    .command(|_: &Scratch| "CALL")
                    .retry(RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(3))
                    .timeout(Duration::from_secs(5)),
            )
            .build()
            .unwrap()
    };
    let run = |restarts: bool| {
        let mut t = SagaHarness::new(saga());
        t.start("r-1", Scratch::default()).unwrap();
        if restarts {
            t.restart().unwrap();
            // The restart went through JSON: what is not serialized is gone.
            assert_eq!(t.data(), &Scratch { kept: 1, lost: 0 });
        }
        t.advance(Duration::from_secs(5)).unwrap(); // a timer armed before the restart fires
        if restarts {
            // Waiting on a command: the instance reads back equal.
            let before = t.instance().clone();
            t.restart().unwrap();
            assert_eq!(t.instance(), &before);
            assert!(t.instance().awaiting.is_some());
        }
        t.advance(Duration::from_secs(1)).unwrap();
        t.reply_ok("call", &"done").unwrap();
        t
    };
    let (plain, restarted) = (run(false), run(true));
    restarted.then_status(&SagaStatus::Completed);
    assert_eq!(plain.data().kept, restarted.data().kept);
    assert_eq!(plain.instance().history, restarted.instance().history);
    let ids = |t: &SagaHarness<Scratch>| -> Vec<String> {
        t.commands().iter().map(|c| c.id.to_string()).collect()
    };
    assert_eq!(ids(&plain), ids(&restarted));
    assert_eq!(
        ids(&restarted).len(),
        2,
        "the timed-out attempt was retried once"
    );
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
    assert_eq!(notice.id.as_str(), "hooked:h-1/command/1");
    assert_eq!(notice.idempotency_key(), "hooked:h-1/command/1");
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

#[test]
fn a_failure_verdict_on_an_earlier_attempts_late_reply_changes_nothing() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-a", Order::default()).unwrap();
    t.advance(Duration::from_secs(5)).unwrap(); // attempt 1 timed out; backoff 1 s
                                                // During the backoff, attempt 1's late refusal: already judged.
    let during_backoff = t
        .reply_to_attempt("reserve", 1, &Reserved { ok: false })
        .unwrap();
    assert_eq!(during_backoff, Handled::Ignored(Ignored::AlreadyJudged));
    t.advance(Duration::from_secs(1)).unwrap(); // attempt 2 sent
                                                // While attempt 2 is in flight, a redelivered refusal of attempt 1 says
                                                // nothing of it: the step neither fails nor loses attempt 2's deadline.
    let handled = t
        .reply_to_attempt("reserve", 1, &Reserved { ok: false })
        .unwrap();
    assert_eq!(handled, Handled::Ignored(Ignored::EarlierAttempt));
    assert_eq!(t.instance().steps[1].state, StepState::Running);
    assert!(
        t.instance().next_timer().is_some(),
        "attempt 2's deadline stays"
    );
    t.reply_ok("reserve", &Reserved { ok: true }).unwrap();
    t.then_status(&SagaStatus::Completed);
}

/// reserve (compensatable, local) → email (retryable, remote), with a
/// whole-saga deadline of 30 s and no pivot.
fn deadline_saga() -> SagaDefinition<Order> {
    SagaDefinition::<Order>::builder("deadline")
        .step(
            Step::<Order>::local("reserve", |ctx| {
                ctx.data_mut().reserved = true;
                Ok(())
            })
            .compensate_local(|ctx| {
                ctx.data_mut().reserved = false;
                Ok(())
            }),
        )
        .step(
            Step::remote("email", "mail")
                .command(|_: &Order| "MAIL")
                .retryable(),
        )
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[test]
fn the_saga_deadline_never_compensates_past_the_point_of_no_return() {
    // A retryable step in flight is past the point of no return.
    let mut t = SagaHarness::new(deadline_saga());
    t.start("d-1", Order::default()).unwrap();
    t.advance(Duration::from_secs(30)).unwrap();
    t.then_status(&SagaStatus::Running);
    assert!(t.data().reserved, "nothing was compensated");
    t.reply_ok("email", &"sent").unwrap();
    t.then_status(&SagaStatus::Completed);

    // So is a pivot an operator skipped.
    let saga = SagaDefinition::<Order>::builder("skipped")
        .step(
            Step::<Order>::local("reserve", |ctx| {
                ctx.data_mut().reserved = true;
                Ok(())
            })
            .compensate_local(|ctx| {
                ctx.data_mut().reserved = false;
                Ok(())
            }),
        )
        .step(
            Step::remote("pay", "payments")
                .command(|_: &Order| "PAY")
                .retry(RetryPolicy::no_retry())
                .timeout(Duration::from_secs(5))
                .pivot(),
        )
        .step(
            Step::remote("ship", "shipping")
                .command(|_: &Order| "SHIP")
                .retryable(),
        )
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut t = SagaHarness::new(saga);
    t.start("d-2", Order::default()).unwrap();
    t.advance(Duration::from_secs(5)).unwrap();
    assert!(t.status().is_parked());
    t.operator(Operation::skip("ops").note("paid by phone"))
        .unwrap();
    t.advance(Duration::from_secs(25)).unwrap();
    t.then_status(&SagaStatus::Running);
    assert!(t.data().reserved);
}

#[test]
fn a_pivot_parked_by_the_saga_deadline_waits_for_an_operator() {
    let saga = SagaDefinition::<Order>::builder("pay")
        .step(
            Step::remote("pay", "payments")
                .command(|_: &Order| "PAY")
                .retry(RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(5))
                .pivot(),
        )
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut t = SagaHarness::new(saga);
    t.start("p-1", Order::default()).unwrap();
    t.advance(Duration::from_secs(10)).unwrap();
    assert!(t.status().is_parked(), "{:?}", t.status());
    // A retryable failure of the parked attempt is recorded; it does not
    // send the pivot again on its own.
    t.reply_failure("pay", ErrorClass::Retryable, "503")
        .unwrap();
    assert!(t.status().is_parked(), "{:?}", t.status());
    t.advance(Duration::from_secs(60)).unwrap();
    assert_eq!(t.commands().len(), 1, "no command without an operator");
}

#[test]
fn an_operators_action_for_another_step_than_the_parked_one_is_refused() {
    let mut t = SagaHarness::new(order_saga());
    t.start("o-f", Order::default()).unwrap();
    t.advance(Duration::from_secs(11)).unwrap();
    assert!(t.status().is_parked());
    let err = t
        .operator(Operation::skip("ops").on_step("create"))
        .unwrap_err();
    assert!(matches!(err, SagaError::InvalidAction { .. }), "{err}");
    assert!(err.to_string().contains("on step `reserve`"), "{err}");
    t.operator(Operation::retry("ops").on_step("reserve"))
        .unwrap();
    t.then_status(&SagaStatus::Running);
}

#[test]
fn a_compensation_on_a_step_that_is_never_compensated_is_refused() {
    let err = SagaDefinition::<()>::builder("pay")
        .step(
            Step::<()>::local("charge", |_| Ok(()))
                .compensate_local(|_| Ok(()))
                .pivot(),
        )
        .build()
        .unwrap_err();
    assert!(
        matches!(err, SagaError::InvalidStep { ref step, .. } if step == "charge"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("a pivot step is never compensated"),
        "{err}"
    );
}

#[tokio::test]
async fn a_runtime_refuses_a_second_saga_or_participant_of_one_name() {
    let runtime = InMemoryRuntime::new(MemoryBackend::new());
    runtime.saga(order_saga()).await.unwrap();
    let err = runtime.saga(order_saga()).await.unwrap_err();
    assert!(
        matches!(err, SagaError::AlreadyRegistered { ref name } if name == "order"),
        "{err}"
    );
    let err = runtime
        .participant(
            "x",
            ParticipantPolicy::new("order"),
            testing::ScriptedParticipant::new(testing::Scripted::Reply(serde_json::json!(1))),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, SagaError::AlreadyRegistered { .. }), "{err}");
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_runtime_refuses_a_step_that_gives_up_before_its_participant() {
    let runtime = InMemoryRuntime::new(MemoryBackend::new());
    let slow = ParticipantPolicy::new("inventory")
        .retry(RetryPolicy::fixed(Duration::from_secs(2)).with_max_attempts(3))
        .timeout(Duration::from_secs(5));
    runtime
        .participant(
            "inventory.requests",
            slow,
            testing::ScriptedParticipant::new(testing::Scripted::Reply(
                serde_json::json!({"ok": true}),
            )),
        )
        .await
        .unwrap();
    // `reserve` waits 5 s; the inventory may take 3 × 5 s + 2 × 2 s.
    let err = runtime.saga(order_saga()).await.unwrap_err();
    match err {
        SagaError::RetryBudget {
            step,
            timeout,
            budget,
            attempts,
            ..
        } => {
            assert_eq!(step, "reserve");
            assert_eq!(timeout, Duration::from_secs(5));
            assert_eq!(budget, Duration::from_secs(19));
            assert_eq!(attempts, 3);
        }
        other => panic!("expected RetryBudget, got {other}"),
    }
    runtime.shutdown().await;
}

#[test]
fn replies_that_do_not_complete_the_step_keep_the_awaited_command() {
    let def = SagaDefinition::<Order>::builder("order")
        .step(
            reserve_step(|| StepError::retryable("busy"))
                .timeout(Duration::from_secs(5))
                .retry(RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(3)),
        )
        .build()
        .unwrap();
    let now = Timestamp::from_millis(1_000);
    let t = def
        .start(SagaId::new("o-1"), Order::default(), now)
        .unwrap();
    let kept = t.instance.awaiting.clone().unwrap().command;
    let cmd = kept.decode().unwrap();
    assert_eq!(
        t.instance.timers[0].id.as_str(),
        "reserve/forward/deadline/1"
    );
    let reply = |outcome: ReplyOutcome, ok: bool| {
        let payload = serde_json::json!({ "ok": ok });
        Input::Reply(cmd.reply(outcome, payload, now).unwrap())
    };

    // Ignored (a reply to a command not sent yet): the instance as it was.
    let mut early = cmd
        .reply(ReplyOutcome::Success, serde_json::json!({"ok": true}), now)
        .unwrap();
    early.attempt = 2;
    let ignored = def.handle(&t.instance, Input::Reply(early), now).unwrap();
    assert_eq!(ignored.handled, Handled::Ignored(Ignored::NotAwaited));
    assert_eq!(ignored.instance, t.instance);

    // Refused by the step's reply handler, or a failure reply: the command
    // is still awaited (judged, for a late success to it).
    let failure = ReplyOutcome::failure(ErrorClass::Retryable, "busy");
    for input in [reply(ReplyOutcome::Success, false), reply(failure, false)] {
        let retried = def.handle(&t.instance, input, now).unwrap();
        assert_eq!(retried.handled, Handled::Applied);
        let awaiting = retried.instance.awaiting.as_ref().expect("still awaited");
        assert_eq!(awaiting.command, kept);
        assert!(!awaiting.in_flight);
        // And a later success to it completes the step.
        let late = def
            .handle(&retried.instance, reply(ReplyOutcome::Success, true), now)
            .unwrap();
        assert_eq!(late.instance.status, SagaStatus::Completed);
        assert!(late.instance.awaiting.is_none());
    }

    // Accepted: nothing awaited any more.
    let done = def
        .handle(&t.instance, reply(ReplyOutcome::Success, true), now)
        .unwrap();
    assert_eq!(done.instance.status, SagaStatus::Completed);
    assert!(done.instance.awaiting.is_none());
}

#[test]
fn a_reply_handler_that_changes_the_data_and_fails_leaves_the_data_as_it_was() {
    let def = SagaDefinition::<Order>::builder("order")
        .step(
            Step::remote("reserve", "inventory.requests")
                .command(|_: &Order| "RESERVE")
                .on_reply(|ctx, r: Reserved| {
                    ctx.data_mut().reserved = true;
                    ctx.emit("orders.events", &"RESERVED");
                    if r.ok {
                        Ok(())
                    } else {
                        Err(StepError::retryable("busy"))
                    }
                }),
        )
        .build()
        .unwrap();
    let now = Timestamp::from_millis(1_000);
    let t = def
        .start(SagaId::new("o-1"), Order::default(), now)
        .unwrap();
    let cmd = t
        .instance
        .awaiting
        .clone()
        .unwrap()
        .command
        .decode()
        .unwrap();
    let reply = |ok: bool| {
        let payload = serde_json::json!({ "ok": ok });
        Input::Reply(cmd.reply(ReplyOutcome::Success, payload, now).unwrap())
    };
    let refused = def.handle(&t.instance, reply(false), now).unwrap();
    assert_eq!(refused.instance.data, Order::default());
    assert!(!refused
        .effects
        .iter()
        .any(|e| matches!(e, Effect::Send(env) if env.kind == MessageKind::Event)));
    let accepted = def.handle(&refused.instance, reply(true), now).unwrap();
    assert!(accepted.instance.data.reserved);
}

/// The texts every instance writes alike (history lines, step names, timer
/// ids) are one allocation shared by the instances, not a copy each, and
/// instances read back from their state records share them too.
#[test]
fn instances_share_the_texts_they_write_alike_and_so_do_instances_read_back() {
    use std::sync::Arc;
    let def = order_saga();
    let now = Timestamp::from_millis(1_000);
    let a = def.start(SagaId::new("a"), Order::default(), now).unwrap();
    let b = def.start(SagaId::new("b"), Order::default(), now).unwrap();
    let (a, b) = (a.instance, b.instance);
    assert_eq!(a.history.len(), b.history.len());
    for (x, y) in a.history.iter().zip(&b.history) {
        assert_eq!(x.what, y.what);
        assert!(Arc::ptr_eq(&x.what, &y.what), "history line {:?}", x.what);
    }
    assert!(Arc::ptr_eq(&a.timers[0].id.0, &b.timers[0].id.0));

    let bytes = |i: &SagaInstance<Order>| serde_json::to_vec(i).unwrap();
    let ra: SagaInstance<Order> = serde_json::from_slice(&bytes(&a)).unwrap();
    let rb: SagaInstance<Order> = serde_json::from_slice(&bytes(&b)).unwrap();
    assert_eq!(ra, a, "read back as written");
    assert!(Arc::ptr_eq(&ra.saga, &rb.saga));
    assert!(Arc::ptr_eq(&ra.steps[0].name, &rb.steps[0].name));
    assert!(Arc::ptr_eq(&ra.timers[0].id.0, &rb.timers[0].id.0));
    for (x, y) in ra.history.iter().zip(&rb.history) {
        assert!(Arc::ptr_eq(&x.what, &y.what), "history line {:?}", x.what);
    }
    // The timer id is written as its text, as before.
    let json = serde_json::to_value(&a).unwrap();
    assert_eq!(json["timers"][0]["id"], "reserve/forward/deadline/1");
}

/// The history lines of a saga that retries, gives up and compensates,
/// under a saga deadline: their exact text (unchanged by sharing them),
/// and one allocation for the lines two instances write alike.
#[test]
fn history_lines_read_as_before_and_two_instances_share_the_ones_they_write_alike() {
    use std::sync::Arc;
    let def = SagaDefinition::<Order>::builder("order")
        .step(Step::<Order>::local("create", |_| Ok(())).compensate_local(|_| Ok(())))
        .step(Step::<Order>::local("note", |_| Ok(())))
        .step(
            reserve_step(|| StepError::retryable("busy"))
                .timeout(Duration::from_secs(5))
                .retry(RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(2)),
        )
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let run = |id: &str| {
        let now = Timestamp::from_millis(1_000);
        let mut inst = def
            .start(SagaId::new(id), Order::default(), now)
            .unwrap()
            .instance;
        assert!(inst.timers.iter().any(|t| t.id.as_str() == "saga-deadline"));
        for _ in 0..2 {
            let cmd = inst.awaiting.as_ref().unwrap().command.decode().unwrap();
            let reply = cmd
                .reply(ReplyOutcome::Success, serde_json::json!({"ok": false}), now)
                .unwrap();
            inst = def
                .handle(&inst, Input::Reply(reply), now)
                .unwrap()
                .instance;
            if let Some(backoff) = inst
                .timers
                .iter()
                .find(|t| t.id.as_str() == "reserve/forward/backoff/1")
                .cloned()
            {
                inst = def
                    .handle(&inst, Input::Timer(backoff.id), backoff.fire_at)
                    .unwrap()
                    .instance;
            }
        }
        assert_eq!(inst.status, SagaStatus::Compensated);
        inst
    };
    let deadline = |id: &str| {
        let t = def.start(SagaId::new(id), Order::default(), Timestamp::from_millis(1));
        let t = t.unwrap().instance.timers;
        t.into_iter()
            .find(|t| t.kind == TimerKind::SagaDeadline)
            .unwrap()
            .id
    };
    assert!(Arc::ptr_eq(&deadline("c").0, &deadline("d").0));
    let (a, b) = (run("a"), run("b"));
    let lines: Vec<&str> = a.history.iter().map(|h| &*h.what).collect();
    let shared = [
        "started",
        "step `create`: succeeded",
        "step `note`: succeeded",
        "step `reserve`: forward command 1 sent (attempt 1)",
        "step `reserve`: forward command 2 sent (attempt 2)",
        "step `note`: nothing to compensate",
        "step `create`: compensated",
        "compensated",
    ];
    for line in shared {
        assert!(lines.contains(&line), "{line:?} in {lines:#?}");
    }
    for (x, y) in a.history.iter().zip(&b.history) {
        assert_eq!(x.what, y.what);
        if shared.contains(&&*x.what) {
            assert!(Arc::ptr_eq(&x.what, &y.what), "{:?}", x.what);
        }
    }
    assert_eq!(a.history.len(), b.history.len());
}
