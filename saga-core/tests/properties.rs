//! Property-based simulation of the pure core: random step outcomes, lost,
//! duplicated and reordered messages, timer firings and crash/restarts.
//!
//! Participants are modelled with the real `ParticipantLedger` (dedup by
//! message id). Invariants checked on every run:
//! - the saga ends Completed, Compensated or Parked with a reason;
//! - a step's effect is applied at most once, and undone at most once, and
//!   only if it was applied;
//! - a Compensated saga has undone every effect of its compensatable steps;
//! - no compensation runs once a pivot or retriable step took effect;
//! - no (step, phase, attempt) command is sent twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use saga_core::*;
use serde_json::{json, Value};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Data {
    touched: Vec<u32>,
}

#[derive(Clone, Debug)]
struct StepShape {
    remote: bool,
    compensated: bool,
    attempts: u32,
    compensation_attempts: u32,
}

fn shape() -> impl Strategy<Value = StepShape> {
    (any::<bool>(), any::<bool>(), 1u32..=3, 1u32..=3).prop_map(
        |(remote, compensated, attempts, compensation_attempts)| StepShape {
            remote,
            compensated,
            attempts,
            compensation_attempts,
        },
    )
}

/// Entropy tape: every random decision of a run reads from it; when it runs
/// out, decisions fall back to "deliver the oldest message, succeed".
struct Tape(VecDeque<u8>);

impl Tape {
    fn pick(&mut self, n: usize) -> usize {
        self.0.pop_front().map_or(0, |b| b as usize % n.max(1))
    }
}

#[derive(Default)]
struct World {
    applied: HashMap<usize, u32>,
    undone: HashMap<usize, u32>,
    /// Set once a pivot or retriable step took effect.
    past_no_return: bool,
    compensations_after_no_return: u32,
    tape: Vec<u8>,
    cursor: usize,
}

impl World {
    fn pick(&mut self, n: usize) -> usize {
        let b = self.tape.get(self.cursor).copied();
        self.cursor += 1;
        b.map_or(0, |b| b as usize % n.max(1))
    }
}

fn build(
    shapes: &[StepShape],
    pivot: Option<usize>,
    world: &Arc<Mutex<World>>,
) -> SagaDefinition<Data> {
    let mut b = SagaDefinition::<Data>::builder("sim");
    for (i, s) in shapes.iter().enumerate() {
        let kind = match pivot {
            Some(p) if i == p => StepKind::Pivot,
            Some(p) if i > p => StepKind::Retriable,
            _ => StepKind::Compensatable,
        };
        let mut step = if s.remote {
            Step::remote(format!("s{i}"), format!("ch{i}"))
                .command(move |_: &Data| json!({ "step": i }))
                .on_reply(move |ctx, reply: Value| {
                    if reply.get("refused").is_some() {
                        return Err(StepError::permanent("refused by the participant"));
                    }
                    ctx.data_mut().touched.push(i as u32);
                    Ok(())
                })
                .timeout(Duration::from_secs(1))
        } else {
            let w = world.clone();
            Step::<Data>::local(format!("s{i}"), move |ctx| {
                let mut w = w.lock().unwrap();
                match w.pick(4) {
                    0 => Err(StepError::retryable("local hiccup")),
                    1 => Err(StepError::permanent("local refusal")),
                    _ => {
                        *w.applied.entry(i).or_default() += 1;
                        if kind != StepKind::Compensatable {
                            w.past_no_return = true;
                        }
                        ctx.data_mut().touched.push(i as u32);
                        Ok(())
                    }
                }
            })
        };
        if s.compensated && kind == StepKind::Compensatable {
            if s.remote {
                step =
                    step.compensate_remote(format!("ch{i}"), move |_: &Data| json!({ "undo": i }));
            } else {
                let w = world.clone();
                step = step.compensate_local(move |_ctx| {
                    let mut w = w.lock().unwrap();
                    if w.past_no_return {
                        w.compensations_after_no_return += 1;
                    }
                    match w.pick(5) {
                        0 => Err(StepError::retryable("undo hiccup")),
                        _ => {
                            *w.undone.entry(i).or_default() += 1;
                            Ok(())
                        }
                    }
                });
            }
        }
        step = step
            .kind(kind)
            .retry(RetryPolicy::fixed(Duration::from_millis(100)).with_max_attempts(s.attempts))
            .compensation_retry(
                RetryPolicy::fixed(Duration::from_millis(100))
                    .with_max_attempts(s.compensation_attempts),
            );
        b = b.step(step);
    }
    b.build().expect("generated definitions are valid")
}

/// What a model participant does with a fresh command.
fn participant_outcome(tape: &mut Tape) -> u8 {
    // 0 success, 1 success but reply lost, 2 retryable failure,
    // 3 permanent failure, 4 business refusal, 5 no answer at all.
    const WEIGHTS: [u8; 10] = [0, 0, 0, 0, 1, 2, 2, 3, 4, 5];
    WEIGHTS[tape.pick(WEIGHTS.len())]
}

fn run(shapes: Vec<StepShape>, pivot: Option<usize>, tape: Vec<u8>) -> Result<(), TestCaseError> {
    let world = Arc::new(Mutex::new(World {
        tape: tape.iter().rev().copied().collect(),
        ..World::default()
    }));
    let def = build(&shapes, pivot, &world);
    let mut tape = Tape(tape.into());
    let mut now = Timestamp::from_millis(1_000_000);
    let policy = ParticipantPolicy::new("model").retry(RetryPolicy::no_retry());
    let mut ledgers: HashMap<String, ParticipantLedger> = HashMap::new();
    let mut sent: HashSet<(String, Phase, u32)> = HashSet::new();
    let mut in_flight: Vec<Envelope> = Vec::new();

    let t = def
        .start(SagaId::new("saga-1"), Data { touched: vec![] }, now)
        .unwrap();
    let mut inst = t.instance;
    let mut effects = t.effects;

    for _ in 0..3_000 {
        for e in effects.drain(..) {
            if let Effect::Send(env) = e {
                if env.kind == MessageKind::Command {
                    let key = (env.step.clone().unwrap(), env.phase.unwrap(), env.attempt);
                    prop_assert!(sent.insert(key.clone()), "command {key:?} sent twice");
                    in_flight.push(env);
                }
            }
        }
        {
            let w = world.lock().unwrap();
            prop_assert_eq!(
                w.compensations_after_no_return,
                0,
                "compensated after the point of no return"
            );
        }
        if inst.status.is_settled() && in_flight.is_empty() {
            break;
        }
        // Choose: deliver (maybe duplicating), fire the next timer, or crash.
        let choice = if in_flight.is_empty() {
            7
        } else {
            tape.pick(8)
        };
        match choice {
            0..=5 => {
                let i = tape.pick(in_flight.len());
                let duplicate = choice == 5;
                let env = if duplicate {
                    in_flight[i].clone()
                } else {
                    in_flight.remove(i)
                };
                match env.kind {
                    MessageKind::Command => {
                        let step: usize = env.step.as_ref().unwrap()[1..].parse().unwrap();
                        let ledger = ledgers.entry(env.channel.clone()).or_default();
                        let Delivery::Attempt(n) = ledger.delivery(&env) else {
                            if let Delivery::Duplicate(Some(reply)) = ledger.delivery(&env) {
                                in_flight.push(*reply);
                            }
                            continue;
                        };
                        let outcome = participant_outcome(&mut tape);
                        let compensation = env.phase == Some(Phase::Compensation);
                        let result = match outcome {
                            0 | 1 => {
                                let mut w = world.lock().unwrap();
                                if compensation {
                                    if w.past_no_return {
                                        w.compensations_after_no_return += 1;
                                    }
                                    // Undo only what was done (an indeterminate step may not have been).
                                    if w.applied.get(&step).copied().unwrap_or(0)
                                        > w.undone.get(&step).copied().unwrap_or(0)
                                    {
                                        *w.undone.entry(step).or_default() += 1;
                                    }
                                } else {
                                    *w.applied.entry(step).or_default() += 1;
                                    if pivot.is_some_and(|p| step >= p) {
                                        w.past_no_return = true;
                                    }
                                }
                                AttemptResult::Replied {
                                    reply: json!({"ok": true}),
                                    events: vec![],
                                }
                            }
                            4 if !compensation => AttemptResult::Replied {
                                reply: json!({"refused": true}),
                                events: vec![],
                            },
                            2 => AttemptResult::Failed {
                                class: ErrorClass::Retryable,
                                error: "503".into(),
                            },
                            3 => AttemptResult::Failed {
                                class: ErrorClass::Permanent,
                                error: "400".into(),
                            },
                            _ => continue, // no answer: the orchestrator's deadline decides
                        };
                        if let AttemptResult::Failed {
                            class: ErrorClass::Retryable,
                            error,
                        } = &result
                        {
                            // Retryable failures are not cached by the ledger: reply directly.
                            let reply = env
                                .reply(
                                    ReplyOutcome::Failure {
                                        class: ErrorClass::Retryable,
                                        error: error.clone(),
                                    },
                                    Value::Null,
                                    now,
                                )
                                .unwrap();
                            in_flight.push(reply);
                            continue;
                        }
                        let out = ledger.record(&policy, &env, n, result, now, |_| (None, vec![]));
                        for e in out {
                            if let Effect::Send(reply) = e {
                                if reply.kind == MessageKind::Reply && outcome != 1 {
                                    in_flight.push(reply);
                                }
                            }
                        }
                    }
                    MessageKind::Reply => {
                        let t = def.handle(&inst, Input::Reply(env), now).unwrap();
                        inst = t.instance;
                        effects = t.effects;
                    }
                    MessageKind::Event => {}
                }
            }
            6 => {
                // Crash and recover: the instance goes through its stored form.
                let json = serde_json::to_string(&inst).unwrap();
                inst = serde_json::from_str(&json).unwrap();
            }
            _ => {
                let Some(timer) = inst.next_timer().cloned() else {
                    prop_assert!(
                        inst.status.is_settled() || !in_flight.is_empty(),
                        "saga stuck: status {:?}, nothing in flight, no timer",
                        inst.status
                    );
                    if in_flight.is_empty() {
                        break;
                    }
                    continue;
                };
                now = now.max(timer.fire_at);
                let t = def.handle(&inst, Input::Timer(timer.id), now).unwrap();
                inst = t.instance;
                effects = t.effects;
            }
        }
    }

    prop_assert!(
        inst.status.is_settled(),
        "saga did not settle: {:?}",
        inst.status
    );
    if let SagaStatus::Parked { reason } = &inst.status {
        prop_assert!(!reason.is_empty());
    }
    let w = world.lock().unwrap();
    for (i, s) in shapes.iter().enumerate() {
        let applied = w.applied.get(&i).copied().unwrap_or(0);
        let undone = w.undone.get(&i).copied().unwrap_or(0);
        prop_assert!(applied <= 1, "step s{i} applied {applied} times");
        prop_assert!(
            undone <= applied,
            "step s{i} undone {undone} times but applied {applied}"
        );
        let compensatable = pivot.is_none_or(|p| i < p);
        if inst.status == SagaStatus::Compensated && compensatable && s.compensated {
            prop_assert_eq!(
                undone,
                applied,
                "step s{} left applied after compensation; history: {:#?}",
                i,
                inst.history
            );
        }
        if inst.status == SagaStatus::Completed {
            prop_assert_eq!(undone, 0);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_saga_settles_and_effects_are_applied_and_undone_once(
        shapes in prop::collection::vec(shape(), 1..=4),
        pivot_pick in any::<u8>(),
        tape in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let pivot = match pivot_pick as usize % (shapes.len() + 1) {
            0 => None,
            n => Some(n - 1),
        };
        run(shapes, pivot, tape)?;
    }
}
