//! Shared fixtures of the broker tests: a small order saga, its
//! participants, and [`TestBed`], one test's namespace on the broker (a
//! [`KafkaFixture`]) with the saga's topic names, which builds the
//! runtimes the tests run.
#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use saga_core::driver::state_topic;
use saga_core::*;
use saga_kafka::testing::KafkaFixture;
use saga_kafka::{KafkaConfig, KafkaRuntime};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Order {
    pub sku: String,
    pub qty: u32,
    pub cents: u64,
    pub reserved: bool,
    pub paid: bool,
    /// The `wait` step fails (retryably) until this time (ms since epoch).
    pub ready_at: u64,
}

impl Order {
    pub fn new(cents: u64) -> Self {
        Self {
            sku: "LAPTOP-001".into(),
            qty: 1,
            cents,
            reserved: false,
            paid: false,
            ready_at: 0,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "action")]
pub enum StockCommand {
    Reserve { sku: String, qty: u32 },
    Release { sku: String, qty: u32 },
}

#[derive(Serialize, Deserialize)]
pub struct Ok_ {
    pub ok: bool,
}

#[derive(Serialize, Deserialize)]
pub struct Charge {
    pub cents: u64,
}

/// The topic names of the test saga, in a fixture's namespace.
#[derive(Clone, Debug)]
pub struct Topics {
    /// The saga's name (its topics are `<saga>.replies`, `.state`, `.dlq`).
    pub saga: String,
    pub inventory: String,
    pub payments: String,
    pub events: String,
}

impl Topics {
    pub fn new(fx: &KafkaFixture) -> Self {
        Self {
            saga: fx.topic("order"),
            inventory: fx.topic("inventory"),
            payments: fx.topic("payments"),
            events: fx.topic("orders.events"),
        }
    }

    /// Where the participants reply (and starts are announced).
    pub fn replies(&self) -> String {
        format!("{}.replies", self.saga)
    }

    /// The saga's compacted state topic.
    pub fn state(&self) -> String {
        state_topic(&self.saga)
    }

    /// The saga's dead letters.
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.saga)
    }
}

/// create (emits ORDER_CREATED; compensation emits ORDER_CANCELLED) →
/// reserve (remote, compensated by a release) → wait (local, retried every
/// `backoff` until `ready_at`) → pay (remote pivot, declined above 1000
/// cents) → confirm (retryable, emits ORDER_CONFIRMED).
pub fn order_saga(t: &Topics, backoff: Duration) -> SagaDefinition<Order> {
    let events = t.events.clone();
    let events2 = t.events.clone();
    let events3 = t.events.clone();
    SagaDefinition::<Order>::builder(t.saga.clone())
        .step(
            Step::<Order>::local("create", move |ctx| {
                let cents = ctx.data().cents;
                ctx.emit(
                    &events,
                    &serde_json::json!({"type": "ORDER_CREATED", "cents": cents}),
                );
                Ok(())
            })
            .compensate_local(move |ctx| {
                ctx.emit(&events2, &serde_json::json!({"type": "ORDER_CANCELLED"}));
                Ok(())
            }),
        )
        .step(
            Step::remote("reserve", t.inventory.clone())
                .command(|o: &Order| StockCommand::Reserve {
                    sku: o.sku.clone(),
                    qty: o.qty,
                })
                .on_reply(|ctx, r: Ok_| {
                    if r.ok {
                        ctx.data_mut().reserved = true;
                        Ok(())
                    } else {
                        Err(StepError::permanent("no stock"))
                    }
                })
                .compensate_remote(t.inventory.clone(), |o: &Order| StockCommand::Release {
                    sku: o.sku.clone(),
                    qty: o.qty,
                })
                .timeout(Duration::from_secs(20)),
        )
        .step(
            Step::<Order>::local("wait", |ctx| {
                if ctx.now().as_millis() < ctx.data().ready_at {
                    Err(StepError::retryable("not ready yet"))
                } else {
                    Ok(())
                }
            })
            .retry(RetryPolicy::fixed(backoff).with_max_attempts(100)),
        )
        .step(
            Step::remote("pay", t.payments.clone())
                .command(|o: &Order| Charge { cents: o.cents })
                .on_reply(|ctx, r: Ok_| {
                    if r.ok {
                        ctx.data_mut().paid = true;
                        Ok(())
                    } else {
                        Err(StepError::permanent("card declined"))
                    }
                })
                .timeout(Duration::from_secs(20))
                .pivot(),
        )
        .step(
            Step::<Order>::local("confirm", move |ctx| {
                ctx.emit(&events3, &serde_json::json!({"type": "ORDER_CONFIRMED"}));
                Ok(())
            })
            .retryable(),
        )
        .build()
        .expect("valid saga")
}

/// One test's world on the broker: its namespace (the fixture) and the
/// test saga's topics. It builds the runtimes, starts the saga and the
/// participants, and reads back what was committed (through `fx`).
pub struct TestBed {
    pub fx: KafkaFixture,
    pub t: Topics,
}

impl TestBed {
    /// A fresh namespace on the broker at `KAFKA_BOOTSTRAP_SERVERS`, with
    /// the event topic created (the runtimes create the others). Logs go to
    /// the test's output as `RUST_LOG` says (nothing without it).
    pub async fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let bed = Self::names(KafkaFixture::new());
        bed.fx.create_topics(&[&bed.t.events]).await;
        bed
    }

    /// The names in `fx`'s namespace; creates nothing (e.g. on a mock cluster).
    pub fn names(fx: KafkaFixture) -> Self {
        let t = Topics::new(&fx);
        Self { fx, t }
    }

    /// The test configuration of `instance`.
    pub fn config(&self, instance: &str) -> KafkaConfig {
        self.fx.config(instance)
    }

    /// A runtime for `instance` with the test configuration.
    pub fn runtime(&self, instance: &str) -> KafkaRuntime {
        KafkaRuntime::new(self.config(instance)).expect("a valid configuration")
    }

    /// The order saga on `rt`, its `wait` step retried every `backoff`.
    pub async fn orders(&self, rt: &KafkaRuntime, backoff: Duration) -> SagaHandle<Order> {
        rt.saga(order_saga(&self.t, backoff))
            .await
            .expect("the saga's worker")
    }

    /// The participant name of `what` (its consumer group and ledger).
    pub fn participant_name(&self, what: &str) -> String {
        format!("{}-{what}", self.fx.ns())
    }

    /// Registers the inventory and payments participants on `rt`, counting
    /// what each runs; returns (inventory, payments).
    pub async fn run_participants(&self, rt: &KafkaRuntime) -> (Applied, Applied) {
        let inventory = Applied::default();
        let payments = Applied::default();
        rt.participant(
            &self.t.inventory,
            ParticipantPolicy::new(self.participant_name("inventory")),
            Inventory(inventory.clone()),
        )
        .await
        .expect("the inventory's worker");
        rt.participant(
            &self.t.payments,
            ParticipantPolicy::new(self.participant_name("payments")),
            Payments(payments.clone()),
        )
        .await
        .expect("the payments' worker");
        (inventory, payments)
    }

    /// A runtime of its own (instance `participants-0`) running both
    /// participants; returns it with (inventory, payments).
    pub async fn participants(&self) -> (KafkaRuntime, Applied, Applied) {
        let rt = self.runtime("participants-0");
        let (inventory, payments) = self.run_participants(&rt).await;
        (rt, inventory, payments)
    }

    /// The test configuration for a `rdkafka` mock cluster, which neither
    /// creates topics nor takes long timeouts.
    pub fn mock_config(&self) -> KafkaConfig {
        self.config("0")
            .batch(100, Duration::from_millis(20))
            .timeouts(Duration::from_secs(5), Duration::from_secs(2))
            .retries(3, Duration::from_millis(50))
            // The mock cluster does not serve CreateTopics: tests make them.
            .create_topics(false)
    }
}

#[derive(Default)]
struct Runs {
    by_command: HashMap<String, u32>,
    by_step: HashMap<String, u32>,
    traces: Vec<Option<TraceContext>>,
}

/// Counts the runs of a participant's handler, by command (message id:
/// one per attempt of a step) and by step (idempotency key: the same for
/// every attempt).
#[derive(Clone, Default)]
pub struct Applied(Arc<Mutex<Runs>>);

impl Applied {
    pub fn add(&self, ctx: &ParticipantContext) {
        tracing::info!(message_id = %ctx.message_id(), "handler ran");
        let mut runs = self.0.lock().unwrap();
        runs.traces.push(ctx.trace());
        *runs
            .by_command
            .entry(ctx.message_id().as_str().to_owned())
            .or_default() += 1;
        *runs
            .by_step
            .entry(ctx.idempotency_key().to_owned())
            .or_default() += 1;
    }

    /// The most runs of one command: above 1, a redelivery ran again.
    pub fn max_per_command(&self) -> u32 {
        let runs = self.0.lock().unwrap();
        runs.by_command.values().copied().max().unwrap_or(0)
    }

    /// The most runs of one step: above 1, a step took effect twice (a
    /// redelivery ran again, or the saga sent another attempt).
    pub fn max_per_step(&self) -> u32 {
        let runs = self.0.lock().unwrap();
        runs.by_step.values().copied().max().unwrap_or(0)
    }

    /// Distinct commands run.
    pub fn commands(&self) -> usize {
        self.0.lock().unwrap().by_command.len()
    }

    /// Distinct steps run.
    pub fn steps(&self) -> usize {
        self.0.lock().unwrap().by_step.len()
    }

    /// The trace each run saw ([`ParticipantContext::trace`]), in order.
    pub fn traces(&self) -> Vec<Option<TraceContext>> {
        self.0.lock().unwrap().traces.clone()
    }

    /// Runs in all (counting repeats).
    pub fn runs(&self) -> u32 {
        self.0.lock().unwrap().by_command.values().sum()
    }
}

pub struct Inventory(pub Applied);

#[async_trait]
impl Participant for Inventory {
    type Command = StockCommand;
    type Reply = Ok_;
    type Error = StepError;
    async fn handle(
        &self,
        _c: StockCommand,
        ctx: &mut ParticipantContext,
    ) -> Result<Ok_, StepError> {
        self.0.add(ctx);
        Ok(Ok_ { ok: true })
    }
}

pub struct Payments(pub Applied);

#[async_trait]
impl Participant for Payments {
    type Command = Charge;
    type Reply = Ok_;
    type Error = StepError;
    async fn handle(&self, c: Charge, ctx: &mut ParticipantContext) -> Result<Ok_, StepError> {
        self.0.add(ctx);
        Ok(Ok_ {
            ok: c.cents <= 1000,
        })
    }
}

/// How many times each message id appears.
pub fn count_ids(envs: &[Envelope]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in envs {
        *m.entry(e.id.as_str().to_owned()).or_default() += 1;
    }
    m
}

/// How many messages each business key ([`Envelope::idempotency_key`]) has:
/// every attempt of a step's command (and its reply) counts under one key.
pub fn count_keys(envs: &[Envelope]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in envs {
        *m.entry(e.idempotency_key()).or_default() += 1;
    }
    m
}

/// Every message on `topic` is there once: no message id twice (nothing
/// redone) and no step's command twice (no second attempt).
pub fn assert_each_once(topic: &str, envs: &[Envelope]) {
    for (key, n) in count_keys(envs) {
        assert_eq!(n, 1, "{key} on {topic} seen {n} times");
    }
}

/// The event types (`payload.type`) on `events` of saga `id`, in order.
pub fn event_types(events: &[Envelope], id: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.saga_id.as_str() == id)
        .map(|e| e.payload["type"].as_str().unwrap().to_owned())
        .collect()
}

/// Every saga `orders` holds: those of the partitions this process owns.
pub async fn owned<D: SagaData>(orders: &SagaHandle<D>) -> Vec<SagaInstance<D>> {
    let mut all = Vec::new();
    let mut query = SagaQuery::all().local().limit(1000);
    loop {
        let page = orders.list(&query).await.expect("listing the sagas");
        all.extend(page.items);
        match page.next {
            Some(next) => query = query.after(next),
            None => return all,
        }
    }
}

/// Whether `orders` holds saga `id` (its owner has consumed its start).
pub async fn holds<D: SagaData>(orders: &SagaHandle<D>, id: &str) -> bool {
    owned(orders).await.iter().any(|i| i.id.as_str() == id)
}

/// `err` says the broker refused a transaction, of which nothing was
/// written, and that the caller may retry.
pub fn assert_transaction_refused(err: &SagaError) {
    match err {
        SagaError::Unavailable { source, .. } => assert!(
            matches!(
                source.downcast_ref::<saga_kafka::Error>(),
                Some(saga_kafka::Error::Transaction { .. })
            ),
            "not a refused transaction: {err}"
        ),
        other => panic!("not a refused transaction: {other}"),
    }
    assert!(err.is_retryable(), "{err}");
}

/// One partition's state of [`Counter`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    pub count: u64,
    pub ids: Vec<String>,
}

/// A stateful inventory: per partition of its command topic, how many
/// commands it applied and which. Its state is only what the runtime
/// restores (`Participant::restore`).
#[derive(Clone, Default)]
pub struct Counter {
    pub shards: Arc<Mutex<HashMap<u32, Shard>>>,
    pub applied: Applied,
}

impl Counter {
    pub fn total(&self) -> u64 {
        self.shards.lock().unwrap().values().map(|s| s.count).sum()
    }
    /// Every applied command id over all partitions, sorted (repeats kept).
    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .shards
            .lock()
            .unwrap()
            .values()
            .flat_map(|s| s.ids.clone())
            .collect();
        v.sort();
        v
    }
}

#[async_trait]
impl Participant for Counter {
    type Command = StockCommand;
    type Reply = Ok_;
    type Error = StepError;
    async fn handle(
        &self,
        _c: StockCommand,
        ctx: &mut ParticipantContext,
    ) -> Result<Ok_, StepError> {
        self.applied.add(ctx);
        let mut shards = self.shards.lock().unwrap();
        let shard = shards.entry(ctx.partition()).or_default();
        shard.count += 1;
        shard.ids.push(ctx.message_id().as_str().to_owned());
        Ok(Ok_ { ok: true })
    }

    fn snapshot(&self, partition: u32) -> Option<serde_json::Value> {
        self.shards
            .lock()
            .unwrap()
            .get(&partition)
            .map(|s| serde_json::to_value(s).unwrap())
    }

    fn restore(
        &self,
        partition: u32,
        snapshot: Option<serde_json::Value>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut shards = self.shards.lock().unwrap();
        match snapshot {
            Some(v) => {
                shards.insert(partition, serde_json::from_value(v)?);
            }
            None => {
                shards.remove(&partition);
            }
        }
        Ok(())
    }
}

/// The first `Reserve` command of saga `saga_id` on `channel`, answered on
/// `reply_to`.
pub fn reserve_command(channel: &str, reply_to: &str, saga_id: &str) -> Envelope {
    let saga_id = SagaId::new(saga_id);
    let mut env = Envelope::command(
        Envelope::command_id("test", &saga_id, "reserve", Phase::Forward, 1),
        channel,
        saga_id,
        "test",
        serde_json::json!({"action": "Reserve", "sku": "X", "qty": 1}),
        Timestamp::now(),
    );
    env.step = Some("reserve".into());
    env.phase = Some(Phase::Forward);
    env.reply_to = Some(reply_to.to_owned());
    env
}

/// Creates `name` with `partitions` and topic `configs` on `fx`'s broker
/// (for topics the runtime must not create with its defaults).
pub async fn create_topic_with(
    fx: &KafkaFixture,
    name: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::ClientConfig;
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", fx.bootstrap())
        .create()
        .unwrap();
    let mut t = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (k, v) in configs {
        t = t.set(k, v);
    }
    let r = admin
        .create_topics(
            &[t],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    for x in r {
        x.unwrap();
    }
}

/// `n` characters that LZ4 does not shrink: the runtime compresses record
/// batches, so a test that needs a record the broker refuses for its size
/// cannot make it of one repeated character. A fixed pseudo-random
/// sequence over 64 letters.
pub fn incompressible(n: usize) -> String {
    const LETTERS: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(LETTERS[(x >> 58) as usize])
        })
        .collect()
}
