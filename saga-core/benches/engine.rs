//! The engine's own cost: pure-core transitions, sagas end to end on the
//! in-memory runtime, and what a driver spends taking a partition (a
//! start, a rebalance) and giving one up (a rebalance, a shutdown), and
//! the encoding and decoding of the records a saga writes and reads.
//! `cargo bench -p saga-core --bench engine`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use saga_core::driver::{Effect, Input, Transition};
use saga_core::testing::{Scripted, ScriptedParticipant};
use saga_core::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Clone, Serialize, Deserialize)]
struct Order {
    id: u64,
    items: Vec<(String, u32, u64)>,
    status: String,
}

fn order_saga() -> SagaDefinition<Order> {
    SagaDefinition::<Order>::builder("order")
        .step(
            Step::<Order>::local("create", |ctx| {
                ctx.data_mut().status = "PENDING".into();
                ctx.emit("orders.events", &json!({"type": "ORDER_CREATED"}));
                Ok(())
            })
            .compensate_local(|ctx| {
                ctx.data_mut().status = "CANCELLED".into();
                Ok(())
            }),
        )
        .step(
            Step::remote("reserve", "inventory.requests")
                .command(|o: &Order| json!({"action": "RESERVE", "items": o.items}))
                .on_reply(|_, _: serde_json::Value| Ok(()))
                .timeout(Duration::from_secs(5))
                .pivot(),
        )
        .step(
            Step::<Order>::local("confirm", |ctx| {
                ctx.data_mut().status = "CONFIRMED".into();
                ctx.emit("orders.events", &json!({"type": "ORDER_CONFIRMED"}));
                Ok(())
            })
            .retryable(),
        )
        .build()
        .expect("valid saga")
}

fn order(id: u64) -> Order {
    Order {
        id,
        items: vec![
            ("LAPTOP-001".into(), 1, 99_999),
            ("MOUSE-001".into(), 2, 2_999),
        ],
        status: String::new(),
    }
}

/// The command a transition sends, and its participant's success reply.
fn command_and_reply(t: &Transition<Order>, now: Timestamp) -> (Envelope, Envelope) {
    let cmd = t
        .effects
        .iter()
        .find_map(|e| match e {
            Effect::Send(env) if env.kind == MessageKind::Command => Some(env.clone()),
            _ => None,
        })
        .unwrap();
    let reply = cmd
        .reply(ReplyOutcome::Success, json!({"status": "RESERVED"}), now)
        .unwrap();
    (cmd, reply)
}

fn pure_core(c: &mut Criterion) {
    let def = order_saga();
    let now = Timestamp::from_millis(1_700_000_000_000);
    let mut g = c.benchmark_group("pure_core");
    g.throughput(Throughput::Elements(1));
    g.bench_function("start_and_complete_one_saga", |b| {
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            let t = def
                .start(SagaId::new(format!("o-{n}")), order(n), now)
                .unwrap();
            let cmd = t.effects.iter().find_map(|e| match e {
                Effect::Send(env) if env.kind == MessageKind::Command => Some(env),
                _ => None,
            });
            let reply = cmd
                .unwrap()
                .reply(ReplyOutcome::Success, json!({"status": "RESERVED"}), now)
                .unwrap();
            let done = def.handle(&t.instance, Input::Reply(reply), now).unwrap();
            assert_eq!(done.instance.status, SagaStatus::Completed);
        })
    });
    // One transition: a saga waiting on its pivot gets the reply, runs its
    // last local step and completes (the unit the ≥1M transitions/s target
    // counts).
    g.bench_function("one_transition_reply_to_completed", |b| {
        let t = def.start(SagaId::new("o-1"), order(1), now).unwrap();
        let (_, reply) = command_and_reply(&t, now);
        b.iter_batched(
            || reply.clone(),
            |reply| def.handle(&t.instance, Input::Reply(reply), now).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("serialize_and_restore_instance", |b| {
        let t = def.start(SagaId::new("o-1"), order(1), now).unwrap();
        b.iter(|| {
            let bytes = serde_json::to_vec(&t.instance).unwrap();
            let back: SagaInstance<Order> = serde_json::from_slice(&bytes).unwrap();
            back
        })
    });
    g.finish();
}

/// What the Kafka runtime spends per record on the JSON it writes and
/// reads: a command and a reply (the participant decodes one, the saga
/// driver the other), and a saga's state record in progress and settled.
fn codec(c: &mut Criterion) {
    let def = order_saga();
    let now = Timestamp::from_millis(1_700_000_000_000);
    let t = def.start(SagaId::new("o-1"), order(1), now).unwrap();
    let (cmd, reply) = command_and_reply(&t, now);
    let done = def
        .handle(&t.instance, Input::Reply(reply.clone()), now)
        .unwrap()
        .instance;
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("envelope_encode_command", |b| b.iter(|| cmd.to_bytes()));
    g.bench_function("envelope_encode_command_kept", |b| {
        b.iter(|| EncodedEnvelope::encode(&cmd))
    });
    let bytes = cmd.to_bytes();
    g.bench_function("envelope_decode_command", |b| {
        b.iter(|| Envelope::from_bytes(&bytes).unwrap())
    });
    let bytes = reply.to_bytes();
    g.bench_function("envelope_decode_reply", |b| {
        b.iter(|| Envelope::from_bytes(&bytes).unwrap())
    });
    g.bench_function("state_encode_in_progress", |b| {
        b.iter(|| saga_core::driver::encode_state(&t.instance).unwrap())
    });
    g.bench_function("state_encode_completed", |b| {
        b.iter(|| saga_core::driver::encode_state(&done).unwrap())
    });
    let state = saga_core::driver::encode_state(&t.instance).unwrap();
    g.bench_function("state_decode_in_progress", |b| {
        b.iter(|| saga_core::driver::decode_state::<Order>("o-1", &state).unwrap())
    });
    g.finish();
}

fn in_memory_runtime(c: &mut Criterion) {
    const SAGAS: u64 = 500;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("in_memory_runtime");
    g.throughput(Throughput::Elements(SAGAS));
    g.sample_size(10);
    g.bench_function("500_sagas_end_to_end", |b| {
        b.iter_batched(
            || (),
            |()| {
                rt.block_on(async {
                    let runtime = InMemoryRuntime::new(MemoryBackend::new());
                    runtime
                        .participant(
                            "inventory.requests",
                            ParticipantPolicy::new("inventory"),
                            ScriptedParticipant::new(Scripted::Reply(
                                json!({"status": "RESERVED"}),
                            )),
                        )
                        .await
                        .unwrap();
                    let orders = runtime.saga(order_saga()).await.unwrap();
                    let mut ids = Vec::new();
                    for i in 0..SAGAS {
                        ids.push(orders.start(format!("o-{i}"), order(i)).await.unwrap());
                    }
                    for id in &ids {
                        orders
                            .wait_settled(id, Duration::from_secs(60))
                            .await
                            .unwrap();
                    }
                    runtime.shutdown().await;
                })
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// Records a driver keeps per partition in the `restore` and `release`
/// benches: a quarter hour of a 100 sagas/s partition (a fifth of the
/// default settled retention, a quarter of a ledger's default dedupe
/// horizon).
const KEPT_PER_PARTITION: usize = 90_000;

/// A driver that restored three partitions of `KEPT_PER_PARTITION` settled
/// sagas each.
fn restored_saga_driver(settled: &[Vec<u8>]) -> saga_core::driver::SagaDriver<Order> {
    let mut d = saga_core::driver::SagaDriver::new(order_saga());
    for p in 0..3u32 {
        d.restore_begin(p);
        for (i, bytes) in settled.iter().enumerate() {
            if i % 3 == p as usize {
                d.restore_record(p, &format!("o-{i}"), Some(bytes), |_| {});
            }
        }
        d.restore_end(p);
    }
    d
}

/// A participant driver that restored three partitions of
/// `KEPT_PER_PARTITION` answered ledger entries each.
fn restored_participant_driver(
    entries: &[(String, Vec<u8>)],
) -> saga_core::driver::ParticipantDriver {
    let mut d = saga_core::driver::ParticipantDriver::new(
        "inventory.requests",
        ParticipantPolicy::new("inventory"),
        std::sync::Arc::new(ScriptedParticipant::new(Scripted::Reply(json!({})))),
    );
    for p in 0..3u32 {
        d.restore_begin(p);
        for (i, (key, bytes)) in entries.iter().enumerate() {
            if i % 3 == p as usize {
                d.restore_record(p, key, Some(bytes));
            }
        }
        d.restore_end(p).unwrap();
    }
    d
}

/// A partition's worth of records, three times over (one per partition):
/// the state records of settled sagas and of sagas in progress, and the
/// ledger entries answering their commands.
struct Kept {
    settled: Vec<Vec<u8>>,
    in_progress: Vec<Vec<u8>>,
    entries: Vec<(String, Vec<u8>)>,
}

fn kept() -> Kept {
    let def = order_saga();
    let now = Timestamp::now();
    let n = 3 * KEPT_PER_PARTITION;
    let mut kept = Kept {
        settled: Vec::with_capacity(n),
        in_progress: Vec::with_capacity(n),
        entries: Vec::with_capacity(n),
    };
    for i in 0..n {
        let t = def
            .start(SagaId::new(format!("o-{i}")), order(i as u64), now)
            .unwrap();
        kept.in_progress
            .push(saga_core::driver::encode_state(&t.instance).unwrap());
        let (cmd, reply) = command_and_reply(&t, now);
        let entry = json!({"state": "answered", "reply": reply, "at": now});
        kept.entries
            .push((cmd.id.to_string(), serde_json::to_vec(&entry).unwrap()));
        let done = def.handle(&t.instance, Input::Reply(reply), now).unwrap();
        kept.settled
            .push(saga_core::driver::encode_state(&done.instance).unwrap());
    }
    kept
}

/// Restores partition 1 (every third record) of `states` into a new driver.
fn restore_one_partition(states: &[Vec<u8>]) -> saga_core::driver::SagaDriver<Order> {
    let mut d = saga_core::driver::SagaDriver::new(order_saga());
    d.restore_begin(1);
    for (i, bytes) in states.iter().enumerate().skip(1).step_by(3) {
        d.restore_record(1, &format!("o-{i}"), Some(bytes), |_| {});
    }
    d.restore_end(1);
    d
}

/// What a driver spends taking a partition (a start, a rebalance) and
/// giving one up (a rebalance, a shutdown), with a quarter hour of a
/// 100 sagas/s partition kept.
fn restore_and_release(c: &mut Criterion) {
    let kept = kept();
    let mut g = c.benchmark_group("restore");
    g.sample_size(10);
    g.throughput(Throughput::Elements(KEPT_PER_PARTITION as u64));
    g.bench_function("saga_driver_one_partition_of_settled_sagas", |b| {
        b.iter_batched(
            || (),
            |()| restore_one_partition(&kept.settled),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("saga_driver_one_partition_of_sagas_in_progress", |b| {
        b.iter_batched(
            || (),
            |()| restore_one_partition(&kept.in_progress),
            BatchSize::PerIteration,
        )
    });
    g.bench_function(
        "participant_driver_one_partition_of_answered_entries",
        |b| {
            b.iter_batched(
                || {
                    saga_core::driver::ParticipantDriver::new(
                        "inventory.requests",
                        ParticipantPolicy::new("inventory"),
                        std::sync::Arc::new(ScriptedParticipant::new(Scripted::Reply(json!({})))),
                    )
                },
                |mut d| {
                    d.restore_begin(1);
                    for (key, bytes) in kept.entries.iter().skip(1).step_by(3) {
                        d.restore_record(1, key, Some(bytes));
                    }
                    d.restore_end(1).unwrap();
                    d
                },
                BatchSize::PerIteration,
            )
        },
    );
    g.finish();

    let mut g = c.benchmark_group("release");
    g.sample_size(10);
    g.throughput(Throughput::Elements(KEPT_PER_PARTITION as u64));
    g.bench_function("saga_driver_one_of_three_partitions", |b| {
        b.iter_batched(
            || restored_saga_driver(&kept.settled),
            |mut d| {
                d.release(&[1]);
                d
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("participant_driver_one_of_three_partitions", |b| {
        b.iter_batched(
            || restored_participant_driver(&kept.entries),
            |mut d| {
                d.release(&[1]);
                d
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(
    benches,
    pure_core,
    codec,
    in_memory_runtime,
    restore_and_release
);
criterion_main!(benches);
