//! Shared fixtures of the broker tests: a small order saga, its
//! participants, a test configuration and an independent reader.
#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use saga_core::*;
use saga_kafka::{KafkaConfig, KafkaRuntime, TopicSpec};
use serde::{Deserialize, Serialize};

pub fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .expect("KAFKA_BOOTSTRAP_SERVERS must point at a broker (scripts/test.sh starts one)")
}

/// A random namespace for topic names, groups and transactional ids.
pub fn ns() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

pub fn config(ns: &str, instance: &str) -> KafkaConfig {
    KafkaConfig::new(bootstrap())
        .app(ns)
        .instance_id(instance)
        .batch(200, Duration::from_millis(30))
        .session_timeout(Duration::from_secs(6))
        .timeouts(Duration::from_secs(15), Duration::from_secs(10))
        .partitions(3)
}

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

pub struct Topics {
    pub saga: String,
    pub inventory: String,
    pub payments: String,
    pub events: String,
}

pub fn topics(ns: &str) -> Topics {
    Topics {
        saga: format!("{ns}-order"),
        inventory: format!("{ns}.inventory"),
        payments: format!("{ns}.payments"),
        events: format!("{ns}.orders.events"),
    }
}

/// create (emits ORDER_CREATED; compensation emits ORDER_CANCELLED) →
/// reserve (remote, compensated by a release) → wait (local, retried every
/// `backoff` until `ready_at`) → pay (remote pivot, declined above 1000
/// cents) → confirm (retriable, emits ORDER_CONFIRMED).
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
            .retriable(),
        )
        .build()
        .expect("valid saga")
}

/// Counts how many times each command was applied.
#[derive(Clone, Default)]
pub struct Applied(pub Arc<Mutex<HashMap<String, u32>>>);

impl Applied {
    pub fn add(&self, id: &MessageId) {
        *self
            .0
            .lock()
            .unwrap()
            .entry(id.as_str().to_owned())
            .or_default() += 1;
    }
    pub fn max(&self) -> u32 {
        self.0.lock().unwrap().values().copied().max().unwrap_or(0)
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    /// Applications in all (counting repeats).
    pub fn sum(&self) -> u32 {
        self.0.lock().unwrap().values().sum()
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
        self.0.add(ctx.message_id());
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
        self.0.add(ctx.message_id());
        Ok(Ok_ {
            ok: c.cents <= 1000,
        })
    }
}

/// Creates the event topic (the runtime creates the rest).
pub async fn create_event_topic(cfg: &KafkaConfig, t: &Topics) {
    saga_kafka::ensure_topics(cfg, &[TopicSpec::messages(t.events.clone())])
        .await
        .unwrap();
}

/// One committed record: its partition, key, `saga-record` header and payload.
pub struct Raw {
    pub partition: i32,
    pub key: String,
    pub record: Option<String>,
    pub payload: Vec<u8>,
}

/// Every committed record on `topic`, read by an independent
/// `read_committed` consumer.
pub fn read_committed_raw(topic: &str) -> Vec<Raw> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let parts: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    assert!(!parts.is_empty(), "{topic} does not exist");
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut left = parts.len();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while left > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "reading {topic} took too long"
        );
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let record = m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "saga-record")
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                out.push(Raw {
                    partition: m.partition(),
                    key: String::from_utf8_lossy(m.key().unwrap_or(&[])).into_owned(),
                    record,
                    payload: m.payload().unwrap_or(&[]).to_vec(),
                });
            }
            Some(Err(RdError::PartitionEOF(_))) => left -= 1,
            Some(Err(e)) => panic!("read error: {e}"),
            None => {}
        }
    }
    out
}

/// Every committed envelope on `topic`, read by an independent
/// `read_committed` consumer (runtime records marked with a header are skipped).
pub fn read_committed(topic: &str) -> Vec<Envelope> {
    read_committed_raw(topic)
        .into_iter()
        .filter(|r| r.record.is_none())
        .map(|r| Envelope::from_bytes(&r.payload).unwrap())
        .collect()
}

/// How many times each message id appears.
pub fn counts(envs: &[Envelope]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in envs {
        *m.entry(e.id.as_str().to_owned()).or_default() += 1;
    }
    m
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
    pub fn partitions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.shards.lock().unwrap().keys().copied().collect();
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
        self.applied.add(ctx.message_id());
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

    fn restore(&self, partition: u32, snapshot: Option<serde_json::Value>) {
        let mut shards = self.shards.lock().unwrap();
        match snapshot {
            Some(v) => {
                shards.insert(partition, serde_json::from_value(v).unwrap());
            }
            None => {
                shards.remove(&partition);
            }
        }
    }
}

/// A `Reserve` command of saga `saga_id` on `channel`, answered on `reply_to`.
pub fn reserve_command(channel: &str, reply_to: &str, saga_id: &str) -> Envelope {
    Envelope {
        id: Envelope::command_id(&SagaId::new(saga_id), "reserve", Phase::Forward),
        channel: channel.to_owned(),
        saga_id: SagaId::new(saga_id),
        saga: "test".into(),
        kind: MessageKind::Command,
        step: Some("reserve".into()),
        phase: Some(Phase::Forward),
        attempt: 1,
        reply_to: Some(reply_to.to_owned()),
        outcome: None,
        timestamp: Timestamp::now(),
        payload: serde_json::json!({"action": "Reserve", "sku": "X", "qty": 1}),
    }
}

/// Creates `name` with `partitions` and topic `configs` on the test broker.
pub async fn create_topic_with(name: &str, partitions: i32, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
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

/// Registers the inventory and payments participants of the test saga on
/// `rt`, counting what each applies; returns (inventory, payments).
pub async fn run_participants(rt: &KafkaRuntime, ns: &str, t: &Topics) -> (Applied, Applied) {
    let inventory = Applied::default();
    let payments = Applied::default();
    rt.participant(
        &t.inventory,
        ParticipantPolicy::new(format!("{ns}-inventory")),
        Inventory(inventory.clone()),
    )
    .await
    .unwrap();
    rt.participant(
        &t.payments,
        ParticipantPolicy::new(format!("{ns}-payments")),
        Payments(payments.clone()),
    )
    .await
    .unwrap();
    (inventory, payments)
}
