//! Shared fixtures of the broker tests: a small order saga, its
//! participants, a test configuration and an independent reader.
#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use saga_core::*;
use saga_kafka::{KafkaConfig, TopicSpec};
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

/// Every committed envelope on `topic`, read by an independent
/// `read_committed` consumer (runtime records marked with a header are skipped).
pub fn read_committed(topic: &str) -> Vec<Envelope> {
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
                if m.headers().is_some() {
                    continue;
                }
                out.push(Envelope::from_bytes(m.payload().unwrap_or(&[])).unwrap());
            }
            Some(Err(RdError::PartitionEOF(_))) => left -= 1,
            Some(Err(e)) => panic!("read error: {e}"),
            None => {}
        }
    }
    out
}

/// How many times each message id appears.
pub fn counts(envs: &[Envelope]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in envs {
        *m.entry(e.id.as_str().to_owned()).or_default() += 1;
    }
    m
}
