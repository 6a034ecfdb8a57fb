//! # saga-core
//!
//! A transport-agnostic saga orchestration engine: typed saga state
//! machines built from steps, with compensations, retry/backoff policies,
//! timeouts and dead letters, plus an embedded in-memory runtime.
//!
//! ## The shape
//!
//! - **A pure core.** A [`SagaInstance`] is a value. [`SagaDefinition::start`]
//!   and [`SagaDefinition::handle`] take an instance, an input (a reply, a
//!   timer, an operator's action) and the time, and return the new instance
//!   and the effects (send a command, publish an event, arm a timer, write a
//!   dead letter). No I/O, no clock, no randomness inside.
//! - **Steps** are what you write: [`Step::local`] runs code in the
//!   orchestrator, [`Step::remote`] sends a typed command to a participant
//!   and folds its typed reply back into the saga data. Each step has a
//!   compensation, a [`RetryPolicy`], a per-attempt timeout and a
//!   [`StepKind`]: compensatable steps are undone in reverse order when a
//!   later step fails; the pivot is the point of no return; retryable steps
//!   after it recover forward and are never compensated.
//! - **Participants** implement [`Participant`]; the runtime gives them
//!   deduplication by message id, retries, timeouts and dead letters.
//! - **Runtimes** own I/O and time, around the [`driver`]s that hold
//!   everything else: `InMemoryRuntime` here (the embedded default and
//!   test double), the Kafka runtime in `saga-kafka`. Both implement
//!   [`Runtime`] and hand out the same [`SagaHandle`], so code written
//!   against them runs on either.
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
//! runtime.participant("inventory.requests", ParticipantPolicy::new("inventory"), Inventory).await?;
//! let orders = runtime.saga(saga).await?;
//!
//! let id = orders.start("order-1", Order {
//!     sku: "LAPTOP-001".into(), qty: 1, cents: 99_999, reserved: false, receipt: None,
//! }).await?;
//! let done = orders.wait_settled(&id, Duration::from_secs(10)).await?;
//! assert_eq!(done.status, SagaStatus::Completed);
//! assert!(done.data.reserved);
//! assert_eq!(done.data.receipt.as_deref(), Some("paid 99999 cents"));
//! runtime.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! ## Who retries what
//!
//! Two parties can retry a remote step's command, each for its own kind of
//! failure, and they compose in one way:
//!
//! - **The participant's runtime** retries transient failures of its own
//!   handler: an `Err` classified [`ErrorClass::Retryable`], or an attempt
//!   cut off by [`ParticipantPolicy::timeout`]. It follows
//!   [`ParticipantPolicy::retry`], which by default does **not** retry
//!   (one attempt per command). When it gives up, a command a saga waits on
//!   is answered with a failure of the same class, and the step decides; a
//!   fire-and-forget command ([`StepContext::send`]), which nobody waits
//!   on, is dead-lettered by the participant.
//! - **The step** retries outcomes the orchestrator judges: a retryable
//!   failure reply, a success reply its [`Step::on_reply`] finds
//!   retryable ("busy"), or no reply within [`Step::timeout`]. It follows
//!   [`Step::retry`] (default [`RetryPolicy::default`]: 3 attempts, 100 ms
//!   then 200 ms apart). **Every attempt is a new command** (a new message
//!   id, [`Envelope::command_id`]), which the participant runs again; a
//!   redelivery of one attempt is deduplicated exactly, and
//!   [`ParticipantContext::idempotency_key`] (the same for every attempt of
//!   a step) lets the participant keep its own effects idempotent.
//! - **How they compose:** the step's per-attempt timeout must cover the
//!   participant's whole budget for one command
//!   ([`ParticipantPolicy::budget`]: attempts × handler timeout + backoffs),
//!   or the step gives up on attempts still in progress. [`SagaDefinition`]
//!   cannot check that at `build()` (the participant is configured
//!   elsewhere, often in another process); a [`Runtime`] checks it when
//!   both are registered on it and refuses the second with
//!   [`SagaError::RetryBudget`].
//! - **When retries run out:** before the point of no return the saga
//!   compensates; a pivot whose outcome is unknown, a retryable step (with
//!   [`Exhausted::Park`], the default) and a failing compensation park the
//!   saga with one dead letter. A parked saga resumes when the late reply
//!   arrives, or when an operator retries (a fresh budget, new commands) or
//!   skips the step ([`Operation`], recorded with who and why). A
//!   retryable step with [`Exhausted::DeadLetterAndContinue`] writes its
//!   dead letter and the saga goes on.
//!
//! The three shapes, as builder calls:
//!
//! ```
//! use std::time::Duration;
//! use saga_core::*;
//! # #[derive(Clone, serde::Serialize, serde::Deserialize)] struct Trip { mailed: bool }
//!
//! // 1. The step retries: 4 attempts, each cut off after 2 s. The
//! //    participant keeps its default (one attempt per command).
//! let hotel = Step::remote("book-hotel", "hotels")
//!     .command(|_: &Trip| "BOOK")
//!     .retry(RetryPolicy::exponential(Duration::from_millis(500), 2.0).with_max_attempts(4))
//!     .timeout(Duration::from_secs(2));
//! let hotels = ParticipantPolicy::new("hotels");
//!
//! // 2. The participant retries its handler: 3 attempts of 1 s, 200 ms and
//! //    400 ms apart (a 3.6 s budget), the step waits 5 s for the outcome
//! //    and does not retry itself.
//! let card = Step::remote("charge-card", "payments")
//!     .command(|_: &Trip| "CHARGE")
//!     .retry(RetryPolicy::no_retry())
//!     .timeout(Duration::from_secs(5))
//!     .pivot();
//! let payments = ParticipantPolicy::new("payments")
//!     .retry(RetryPolicy::exponential(Duration::from_millis(200), 2.0).with_max_attempts(3))
//!     .timeout(Duration::from_secs(1));
//! assert!(payments.budget().unwrap() <= Duration::from_secs(5));
//!
//! // 3. After the pivot: 3 attempts, then a dead letter and the saga
//! //    goes on (the seed's notification).
//! let email = Step::remote("email-itinerary", "notifications")
//!     .command(|_: &Trip| "MAIL")
//!     .retry(RetryPolicy::exponential(Duration::from_secs(2), 2.0).with_max_attempts(3))
//!     .timeout(Duration::from_secs(5))
//!     .retryable()
//!     .on_exhausted(Exhausted::DeadLetterAndContinue);
//!
//! let trip = SagaDefinition::<Trip>::builder("trip")
//!     .step(hotel).step(card).step(email)
//!     .build()
//!     .unwrap();
//! # let _ = (trip, hotels);
//! ```
//!
//! ## Features
//!
//! - `memory` (default): `InMemoryRuntime`, `MemoryBackend`, `Clock`
//!   (pulls tokio's runtime); without it the crate is the pure core and the
//!   drivers.
//! - `metrics` (default): the drivers record metrics through the `metrics`
//!   facade (the table is in [`driver`]'s docs).
//! - `tokio`: `driver::Attempt::run`, an attempt cut off by its timeout on
//!   tokio's clock (on with `memory`).
//! - `otel`: the drivers' spans get their OpenTelemetry parent from the
//!   saga's [`TraceContext`] (through `tracing-opentelemetry`), so the
//!   exported spans of one saga, across services, form one trace (see
//!   [`trace`]).
//! - `testing`: the `testing` module, a harness for your own sagas: given/when/then
//!   on the pure core with a virtual clock, scripted participants, and
//!   `testing::eventually`.
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod definition;
pub mod driver;
mod engine;
mod error;
mod health;
mod ids;
mod instance;
mod mermaid;
mod message;
mod participant;
mod retry;
mod runtime;
pub mod trace;

#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub use definition::{
    Exhausted, SagaBuilder, SagaData, SagaDefinition, Step, StepContext, StepError, StepFailure,
    StepKind,
};
pub use engine::{Operation, OperatorAction};
pub use error::{Result, SagaError};
pub use health::{Health, HealthBoard, Problem};
pub use ids::{MessageId, SagaId, Timestamp};
pub use instance::{HistoryEntry, SagaInstance, SagaStatus, StepRecord, StepState, MAX_HISTORY};
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use memory::{Clock, InMemoryRuntime, MemoryBackend, DEFAULT_PARTITIONS};
pub use message::{
    DeadLetter, EncodedEnvelope, Envelope, MessageKind, Phase, RecordOrigin, ReplyOutcome,
};
pub use participant::{Participant, ParticipantContext, ParticipantPolicy};
pub use retry::{Classify, ErrorClass, GiveUpReason, Jitter, RetryDecision, RetryPolicy};
pub use runtime::{Page, Runtime, SagaHandle, SagaQuery, StatusFilter};
pub use trace::{SpanId, TraceContext, TraceId, TraceParseError, TRACEPARENT_HEADER};
