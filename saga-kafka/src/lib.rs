//! # saga-kafka
//!
//! The Kafka runtime for [`saga_core`]: the same pure saga engine, run on
//! Kafka topics with exactly-once transactions (the default) or
//! at-least-once delivery.
//!
//! [`KafkaRuntime`] implements saga-core's [`Runtime`](saga_core::Runtime)
//! on the same drivers as the in-memory runtime, so code written against
//! [`Runtime`](saga_core::Runtime) and [`SagaHandle`](saga_core::SagaHandle)
//! runs on both.
//!
//! - **Orchestrators** (`runtime.saga(def)`) consume a saga's reply
//!   topics, run the core, and in one transaction per batch produce the
//!   commands and events, the new saga state (compacted topic
//!   `<saga>.state`, keyed by saga id) and the consumed offsets. Timers
//!   (step deadlines, retry backoff) are part of the state: re-armed after
//!   a restart or a rebalance, and fired independently of consumption.
//! - **Participants** (`runtime.participant(..)`) consume a command
//!   topic and reply, with deduplication by message id, retries and dead
//!   letters; their ledgers live in the compacted topic `<name>.ledger`.
//! - **Projections** (`runtime.projection(..)`) see every committed
//!   message of some topics.
//!
//! Every message is an [`Envelope`](saga_core::Envelope) as JSON, keyed by
//! the saga id, so all messages of one saga share a partition number on
//! every topic (topics of one saga must have the same partition count;
//! the runtime checks it).
//!
//! ## Quick start
//!
//! ```no_run
//! use std::time::Duration;
//! use async_trait::async_trait;
//! use serde::{Deserialize, Serialize};
//! use saga_core::*;
//! use saga_kafka::{KafkaConfig, KafkaRuntime};
//!
//! #[derive(Clone, Debug, Serialize, Deserialize)]
//! struct Order { sku: String, qty: u32, reserved: bool }
//!
//! #[derive(Serialize, Deserialize)]
//! #[serde(tag = "action")]
//! enum StockCommand { Reserve { sku: String, qty: u32 }, Release { sku: String, qty: u32 } }
//! #[derive(Serialize, Deserialize)]
//! struct StockReply { ok: bool }
//!
//! struct Inventory;
//! #[async_trait]
//! impl Participant for Inventory {
//!     type Command = StockCommand;
//!     type Reply = StockReply;
//!     type Error = StepError;
//!     async fn handle(&self, _cmd: StockCommand, _ctx: &mut ParticipantContext)
//!         -> Result<StockReply, StepError> {
//!         Ok(StockReply { ok: true })
//!     }
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let saga = SagaDefinition::<Order>::builder("order")
//!     .step(
//!         Step::remote("reserve", "inventory.requests")
//!             .command(|o: &Order| StockCommand::Reserve { sku: o.sku.clone(), qty: o.qty })
//!             .on_reply(|ctx, r: StockReply| {
//!                 if r.ok { ctx.data_mut().reserved = true; Ok(()) }
//!                 else { Err(StepError::permanent("not enough stock")) }
//!             })
//!             .compensate_remote("inventory.requests", |o: &Order| {
//!                 StockCommand::Release { sku: o.sku.clone(), qty: o.qty }
//!             })
//!             .timeout(Duration::from_secs(5)),
//!     )
//!     .build()?;
//!
//! // KAFKA_BOOTSTRAP_SERVERS, security settings, instance id… from the environment.
//! let runtime = KafkaRuntime::new(KafkaConfig::from_env()?)?;
//! runtime.participant("inventory.requests", ParticipantPolicy::new("inventory"), Inventory).await?;
//! let orders = runtime.saga(saga).await?;
//!
//! let id = orders.start("order-1", Order { sku: "LAPTOP-001".into(), qty: 1, reserved: false }).await?;
//! let done = orders.wait_settled(&id, Duration::from_secs(30)).await?;
//! assert_eq!(done.status, SagaStatus::Completed);
//! runtime.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! ## Exactly-once, and what happens on failure
//!
//! Each saga and participant worker owns one transactional producer
//! (`transactional.id` = `<prefix>-<service>-<instance id>`, stable across
//! restarts, so a restarted instance fences its previous incarnation) and a
//! `read_committed` consumer with auto-commit off. Per batch (N messages or
//! T ms) it runs the core, produces the effects and the new state, sends
//! the offsets (last processed + 1) with the consumer's group metadata and
//! commits. A retriable error retries the same call (bounded); an error
//! that requires an abort aborts, rolls the in-memory state back and seeks
//! the consumer back to the batch's first offsets so the batch is redone; a
//! fatal error rebuilds the producer. On a rebalance the open batch is
//! committed before partitions go, and the state of arriving partitions is
//! read from the state topic. A saga's start writes its state and first
//! messages in one transaction; if the broker cannot take it, nothing is
//! written and the caller gets
//! [`SagaError::Unavailable`](saga_core::SagaError::Unavailable) (an HTTP
//! API answers 503): retry.
//!
//! ## Configuration and security
//!
//! See [`KafkaConfig`]: [`KafkaConfig::from_env`] reads
//! `KAFKA_BOOTSTRAP_SERVERS`, `KAFKA_SECURITY_PROTOCOL` (e.g. `SASL_SSL`),
//! `KAFKA_SASL_MECHANISM` (e.g. `SCRAM-SHA-512`), `KAFKA_SASL_USERNAME`,
//! `KAFKA_SASL_PASSWORD`, `KAFKA_SSL_CA_LOCATION`,
//! `KAFKA_SSL_CERTIFICATE_LOCATION`, `KAFKA_SSL_KEY_LOCATION`,
//! `KAFKA_SSL_KEY_PASSWORD`, and the runtime's own settings. Secrets never
//! appear in `Debug` output or logs.
//!
//! ## Observability
//!
//! Tracing spans carry `saga_id`, `saga`, `step` and `attempt`; the
//! saga-core metrics (`saga_started_total`, step latency, retries, dead
//! letters, participant attempts…) are recorded as in the in-memory runtime.
//! [`KafkaRuntime::stats`] counts commits, aborts, retries and producer
//! rebuilds.
//!
//! ## Features
//!
//! - `testing`: `testing::KafkaFixture`, a namespace of its own on a shared
//!   broker for each test, with a `read_committed` reader.
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod acl;
mod admin;
mod aside;
mod catalog;
mod config;
mod context;
mod error;
mod metrics;
mod participant;
mod projection;
mod runtime;
mod saga;
mod store;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod worker;

pub use admin::{ensure_topics, TopicKind, TopicSpec};
pub use config::{DeliveryMode, KafkaConfig};
pub use error::{Error, Result};
pub use runtime::KafkaRuntime;
pub use worker::Stats;
