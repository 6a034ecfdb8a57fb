//! Property-based simulation of the pure core against the real participant
//! driver: random step outcomes, lost, duplicated and reordered messages,
//! timer firings, crashes of the orchestrator and of the participant,
//! "busy" replies the step retries, late replies to parked sagas, and
//! operators retrying or skipping parked steps.
//!
//! Participants are the real `ParticipantDriver` (deduplication by message
//! id, fences of compensated steps, its ledger restored after a crash)
//! around a model participant that keeps its effects idempotent by the
//! command's business key, as the docs ask. Each channel delivers in order,
//! as a Kafka partition does for one saga (but messages are lost,
//! duplicated, and interleaved across channels). Invariants checked on
//! every run:
//! - the saga ends Completed, Compensated or Parked with a reason;
//! - a step's effect is applied at most once, and undone at most once, and
//!   only if it was applied;
//! - a Compensated saga has undone every effect of its compensatable steps
//!   (but those an operator marked compensated by hand);
//! - no compensation runs once a pivot or retryable step took effect;
//! - no command id is sent twice: every attempt is a new command.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use proptest::prelude::*;
use saga_core::driver::{Incoming, Input, ParticipantDriver, Record, RecordKind};
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

#[derive(Default)]
struct World {
    applied: HashMap<usize, u32>,
    undone: HashMap<usize, u32>,
    /// The model participant's own idempotency: business keys done.
    done_keys: HashSet<String>,
    /// Set once a pivot or retryable step took effect.
    past_no_return: bool,
    compensations_after_no_return: u32,
    tape: VecDeque<u8>,
}

impl World {
    fn pick(&mut self, n: usize) -> usize {
        self.tape.pop_front().map_or(0, |b| b as usize % n.max(1))
    }
}

type Shared = Arc<Mutex<World>>;

fn build(shapes: &[StepShape], pivot: Option<usize>, world: &Shared) -> SagaDefinition<Data> {
    let mut b = SagaDefinition::<Data>::builder("sim");
    for (i, s) in shapes.iter().enumerate() {
        let kind = match pivot {
            Some(p) if i == p => StepKind::Pivot,
            Some(p) if i > p => StepKind::Retryable,
            _ => StepKind::Compensatable,
        };
        let mut step = if s.remote {
            Step::remote(format!("s{i}"), format!("ch{i}"))
                .command(move |_: &Data| json!({ "step": i }))
                .on_reply(move |ctx, reply: Value| {
                    if reply.get("refused").is_some() {
                        return Err(StepError::permanent("refused by the participant"));
                    }
                    if reply.get("busy").is_some() {
                        return Err(StepError::retryable("participant busy"));
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
        step = match kind {
            StepKind::Pivot => step.pivot(),
            StepKind::Retryable => step.retryable(),
            _ => step,
        };
        step = step
            .retry(RetryPolicy::fixed(Duration::from_millis(100)).with_max_attempts(s.attempts))
            .compensation_retry(
                RetryPolicy::fixed(Duration::from_millis(100))
                    .with_max_attempts(s.compensation_attempts),
            );
        b = b.step(step);
    }
    b.build().expect("generated definitions are valid")
}

/// The model participant: applies a step's effect at most once per
/// business key (its own idempotency), undoes only what was applied, and
/// otherwise does what the tape says.
struct Model {
    world: Shared,
    pivot: Option<usize>,
}

#[async_trait]
impl Participant for Model {
    type Command = Value;
    type Reply = Value;
    type Error = StepError;

    async fn handle(&self, cmd: Value, ctx: &mut ParticipantContext) -> Result<Value, StepError> {
        let mut w = self.world.lock().unwrap();
        // 0..=3 success, 4 busy, 5 retryable failure, 6 permanent failure, 7 refusal.
        const WEIGHTS: [u8; 10] = [0, 0, 0, 0, 4, 5, 5, 6, 7, 0];
        let outcome = WEIGHTS[w.pick(WEIGHTS.len())];
        let key = ctx.idempotency_key().to_owned();
        if let Some(step) = cmd.get("undo").and_then(Value::as_u64) {
            let step = step as usize;
            if outcome == 5 {
                return Err(StepError::retryable("503"));
            }
            if w.past_no_return {
                w.compensations_after_no_return += 1;
            }
            if w.done_keys.insert(key)
                && w.applied.get(&step).copied().unwrap_or(0)
                    > w.undone.get(&step).copied().unwrap_or(0)
            {
                *w.undone.entry(step).or_default() += 1;
            }
            return Ok(json!({"ok": true}));
        }
        let step = cmd["step"].as_u64().unwrap_or_default() as usize;
        if w.done_keys.contains(&key) {
            // Already took effect: answer the same way, act no more.
            return Ok(json!({"ok": true}));
        }
        match outcome {
            4 => Ok(json!({"busy": true})),
            5 => Err(StepError::retryable("503")),
            6 => Err(StepError::permanent("400")),
            7 => Ok(json!({"refused": true})),
            _ => {
                w.done_keys.insert(key);
                *w.applied.entry(step).or_default() += 1;
                if self.pivot.is_some_and(|p| step >= p) {
                    w.past_no_return = true;
                }
                Ok(json!({"ok": true}))
            }
        }
    }
}

/// A participant driver with its ledger as written (for crash recovery).
struct Side {
    driver: ParticipantDriver,
    ledger: BTreeMap<String, Vec<u8>>,
}

impl Side {
    fn new(world: &Shared, pivot: Option<usize>, ledger: BTreeMap<String, Vec<u8>>) -> Self {
        let model = Arc::new(Model {
            world: world.clone(),
            pivot,
        });
        let mut driver = ParticipantDriver::new("ch", ParticipantPolicy::new("model"), model);
        driver.restore(0, ledger.clone()).unwrap();
        Self { driver, ledger }
    }

    /// Keeps ledger records; returns the rest (replies, events).
    fn keep(&mut self, out: Vec<Record>) -> Vec<Record> {
        let mut rest = Vec::new();
        for r in out {
            match r.kind {
                RecordKind::Ledger | RecordKind::ParticipantState => {
                    match r.value {
                        Some(v) => self.ledger.insert(r.key, v),
                        None => self.ledger.remove(&r.key),
                    };
                }
                _ => rest.push(r),
            }
        }
        rest
    }
}

fn run(shapes: Vec<StepShape>, pivot: Option<usize>, tape: Vec<u8>) -> Result<(), TestCaseError> {
    let world: Shared = Arc::new(Mutex::new(World {
        tape: tape.iter().rev().copied().collect(),
        ..World::default()
    }));
    let def = build(&shapes, pivot, &world);
    let mut tape: VecDeque<u8> = tape.into();
    let mut pick = |n: usize| tape.pop_front().map_or(0, |b| b as usize % n.max(1));
    let block_on = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut now = Timestamp::from_millis(1_000_000);
    let mut side = Side::new(&world, pivot, BTreeMap::new());
    let mut sent: HashSet<String> = HashSet::new();
    let mut in_flight: Vec<Envelope> = Vec::new();
    let mut operator_actions = 0;
    let mut skipped_compensations: HashSet<usize> = HashSet::new();

    let t = def
        .start(SagaId::new("saga-1"), Data { touched: vec![] }, now)
        .unwrap();
    let mut inst = t.instance;
    let mut effects = t.effects;

    for _ in 0..3_000 {
        for e in effects.drain(..) {
            if let driver::Effect::Send(env) = e {
                if env.kind == MessageKind::Command {
                    prop_assert!(
                        sent.insert(env.id.to_string()),
                        "command {} sent twice",
                        env.id
                    );
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
            // A parked saga: an operator may act (a few times per run).
            if inst.status.is_parked() && operator_actions < 2 && pick(2) == 0 {
                operator_actions += 1;
                let op = if pick(2) == 0 {
                    Operation::retry("op")
                } else {
                    if inst.phase == Phase::Compensation {
                        skipped_compensations.insert(inst.cursor);
                    }
                    Operation::skip("op")
                };
                let t = def.handle(&inst, Input::Operator(op), now).unwrap();
                inst = t.instance;
                effects = t.effects;
                continue;
            }
            break;
        }
        // Deliver (maybe duplicating, maybe losing the reply), fire the next
        // timer, crash the orchestrator or the participant.
        let choice = if in_flight.is_empty() { 9 } else { pick(10) };
        match choice {
            0..=5 => {
                // A channel delivers in order (a Kafka partition: all of one
                // saga's messages on it are in one): the oldest message of
                // the picked one's channel goes first. A duplicate (a
                // redelivery) may be of any message.
                let i = pick(in_flight.len());
                let duplicate = choice == 5;
                let i = if duplicate {
                    i
                } else {
                    let channel = in_flight[i].channel.clone();
                    in_flight
                        .iter()
                        .position(|e| e.channel == channel)
                        .unwrap_or(i)
                };
                let env = if duplicate {
                    in_flight[i].clone()
                } else {
                    in_flight.remove(i)
                };
                match env.kind {
                    MessageKind::Command => {
                        let bytes = env.to_bytes();
                        let rec = Incoming {
                            topic: "ch",
                            partition: 0,
                            offset: 0,
                            key: Some(env.saga_id.as_str().as_bytes()),
                            value: Some(&bytes),
                            kind: None,
                            traceparent: None,
                        };
                        let mut out = Vec::new();
                        if let Some(attempt) = side.driver.on_record(&rec, now, &mut out) {
                            let result = block_on.block_on(attempt.run(now));
                            side.driver
                                .finish(attempt, result, Duration::ZERO, now, &mut out);
                        }
                        side.driver.before_commit(&mut out).unwrap();
                        side.driver.committed();
                        let lose_reply = pick(8) == 0;
                        for r in side.keep(out) {
                            let reply = Envelope::from_bytes(r.value.as_deref().unwrap()).unwrap();
                            if reply.kind == MessageKind::Reply && !lose_reply {
                                in_flight.push(reply);
                            }
                        }
                    }
                    MessageKind::Reply => {
                        let t = def.handle(&inst, Input::Reply(env), now).unwrap();
                        inst = t.instance;
                        effects = t.effects;
                    }
                    _ => {}
                }
            }
            6 => {
                // The orchestrator crashes and recovers: the instance goes
                // through its stored form.
                let json = serde_json::to_string(&inst).unwrap();
                inst = serde_json::from_str(&json).unwrap();
            }
            7 => {
                // The participant crashes: a new driver from its ledger.
                let ledger = std::mem::take(&mut side.ledger);
                side = Side::new(&world, pivot, ledger);
            }
            8 => {
                // A command is lost on the way (no answer at all).
                let i = pick(in_flight.len());
                if in_flight[i].kind == MessageKind::Command {
                    in_flight.remove(i);
                }
            }
            _ => {
                let Some(timer) = inst.next_timer().cloned() else {
                    prop_assert!(
                        inst.status.is_settled() || !in_flight.is_empty(),
                        "saga stuck: status {:?}, nothing in flight, no timer",
                        inst.status
                    );
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
        if inst.status == SagaStatus::Compensated
            && compensatable
            && s.compensated
            && !skipped_compensations.contains(&i)
        {
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
