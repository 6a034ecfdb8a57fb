//! # saga-core
//!
//! A transport-agnostic saga orchestration engine: typed saga state
//! machines built from steps, with compensations, retry/backoff policies,
//! timeouts and dead letters, plus an embedded in-memory runtime.
//!
//! ## The shape
//!
//! - **A pure core.** A [`SagaInstance`] is a value. [`SagaDefinition::start`]
//!   and [`SagaDefinition::handle`] take an instance, an [`Input`] (a reply,
//!   a timer, an operator action) and the time, and return the new instance
//!   and a list of [`Effect`]s (send a command, publish an event, arm a
//!   timer, write a dead letter). No I/O, no clock, no randomness inside.
//! - **Steps** are what you write: [`Step::local`] runs code in the
//!   orchestrator, [`Step::remote`] sends a typed command to a participant
//!   and folds its typed reply back into the saga data. Each step has a
//!   compensation, a [`RetryPolicy`], a per-attempt timeout and a
//!   [`StepKind`]: compensatable steps are undone in reverse order when a
//!   later step fails; the pivot is the point of no return; retriable steps
//!   after it recover forward and are never compensated.
//! - **Participants** implement [`Participant`]; the runtime gives them
//!   deduplication by message id, retries, timeouts and dead letters.
//! - **Drivers** own I/O and time: [`InMemoryRuntime`] here (the embedded
//!   default and test double), and the Kafka runtime in `saga-kafka`.
//!
//! ## Quick start
//!
//! A two-step saga: reserve stock at a participant (compensated by a
//! release), then charge a card (the pivot), on the in-memory runtime.
//!
//! ```
//! use std::time::Duration;
//! use async_trait::async_trait;
//! use serde::{Deserialize, Serialize};
//! use saga_core::*;
//!
//! #[derive(Clone, Debug, Serialize, Deserialize)]
//! struct Order { sku: String, qty: u32, cents: u64, reserved: bool, receipt: Option<String> }
//!
//! #[derive(Serialize, Deserialize)]
//! #[serde(tag = "action")]
//! enum StockCommand { Reserve { sku: String, qty: u32 }, Release { sku: String, qty: u32 } }
//!
//! #[derive(Serialize, Deserialize)]
//! struct StockReply { ok: bool }
//!
//! // The inventory participant: always has stock here.
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
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), SagaError> {
//! let saga = SagaDefinition::<Order>::builder("order")
//!     .step(
//!         Step::remote("reserve", "inventory.requests")
//!             .command(|o: &Order| StockCommand::Reserve { sku: o.sku.clone(), qty: o.qty })
//!             .on_reply(|ctx, r: StockReply| {
//!                 if r.ok { ctx.data_mut().reserved = true; Ok(()) }
//!                 else { Err(StepError::permanent("Not enough stock")) }
//!             })
//!             .compensate_remote("inventory.requests", |o: &Order| {
//!                 StockCommand::Release { sku: o.sku.clone(), qty: o.qty }
//!             })
//!             .retry(RetryPolicy::exponential(Duration::from_millis(100), 2.0).with_max_attempts(5))
//!             .timeout(Duration::from_secs(5)),
//!     )
//!     .step(
//!         Step::<Order>::local("charge", |ctx| {
//!             let receipt = format!("paid {} cents", ctx.data().cents);
//!             ctx.data_mut().receipt = Some(receipt);
//!             ctx.emit("orders.events", &serde_json::json!({"type": "ORDER_PAID"}));
//!             Ok(())
//!         })
//!         .pivot(),
//!     )
//!     .build()?;
//!
//! let runtime = InMemoryRuntime::new(MemoryBackend::new());
//! runtime.participant("inventory.requests", ParticipantPolicy::new("inventory"), Inventory);
//! let orders = runtime.saga(saga);
//!
//! let id = orders.start("order-1", Order {
//!     sku: "LAPTOP-001".into(), qty: 1, cents: 99_999, reserved: false, receipt: None,
//! })?;
//! let done = orders.wait_settled(&id, Duration::from_secs(10)).await?;
//! assert_eq!(done.status, SagaStatus::Completed);
//! assert!(done.data.reserved);
//! assert_eq!(done.data.receipt.as_deref(), Some("paid 99999 cents"));
//! runtime.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! ## Features
//!
//! - `testing`: [`testing`], a harness for your own sagas: given/when/then
//!   on the pure core with a virtual clock, injected failures and duplicates.
#![deny(missing_docs)]

mod definition;
mod engine;
mod error;
mod ids;
mod instance;
mod message;
mod participant;
mod retry;

pub use definition::{
    SagaBuilder, SagaData, SagaDefinition, Step, StepContext, StepError, StepKind,
};
pub use engine::{Effect, Handled, Input, OperatorAction, Transition};
pub use error::{Result, SagaError};
pub use ids::{MessageId, SagaId, Timestamp};
pub use instance::{
    Awaiting, HistoryEntry, SagaInstance, SagaStatus, StepRecord, StepState, Timer, TimerId,
    TimerKind, MAX_HISTORY,
};
pub use message::{DeadLetter, Envelope, MessageKind, Phase, ReplyOutcome};
pub use participant::{
    AttemptResult, Delivery, DynParticipant, Participant, ParticipantContext, ParticipantLedger,
    ParticipantPolicy, PendingRetry,
};
pub use retry::{Classify, ErrorClass, GiveUpReason, Jitter, RetryDecision, RetryPolicy};
mod memory;
mod mermaid;
mod observe;
pub use memory::{Clock, InMemoryRuntime, MemoryBackend, SagaHandle, DEFAULT_PARTITIONS};
pub use observe::{record_attempt, record_dead_letters, record_step_latency, record_transition};
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
