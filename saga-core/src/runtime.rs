//! One API over every runtime: [`Runtime`] to register sagas, participants
//! and projections, and [`SagaHandle`] to start, read and operate the
//! instances of one saga type. Code written against them runs on the
//! in-memory runtime and on Kafka alike.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::definition::{SagaData, SagaDefinition};
use crate::engine::Operation;
use crate::error::SagaError;
use crate::health::Health;
use crate::ids::{SagaId, Timestamp};
use crate::instance::SagaInstance;
use crate::message::{DeadLetter, Envelope};
use crate::participant::{Participant, ParticipantPolicy};
use crate::trace::TraceContext;

/// Runs sagas, participants and projections: `InMemoryRuntime` (feature
/// `memory`) and `saga_kafka::KafkaRuntime` implement it.
///
/// The registration methods are generic, so call them on a concrete
/// runtime or through a generic `R: Runtime`; a `dyn Runtime` offers the
/// rest ([`publish`](Runtime::publish), [`dead_letters`](Runtime::dead_letters),
/// [`shutdown`](Runtime::shutdown)).
///
/// ```
/// use saga_core::{Runtime, SagaDefinition, SagaHandle, SagaError, Step};
/// # #[derive(Clone, serde::Serialize, serde::Deserialize)] struct Order;
///
/// // Wiring written once, for any runtime.
/// async fn wire<R: Runtime>(runtime: &R) -> Result<SagaHandle<Order>, SagaError> {
///     let saga = SagaDefinition::<Order>::builder("order")
///         .step(Step::<Order>::local("confirm", |_| Ok(())))
///         .build()?;
///     runtime.saga(saga).await
/// }
/// ```
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// A short name for logs and health checks: `"memory"`, `"kafka"`.
    fn name(&self) -> &'static str;

    /// Runs saga type `def`: consumes its reply channels, keeps its
    /// instances, fires their timers. Returns the handle to its instances.
    ///
    /// # Errors
    /// [`SagaError::RetryBudget`] if a participant registered on this
    /// runtime may take longer on one command than a step waits for it;
    /// runtime errors (a topic it cannot create) as
    /// [`SagaError::Runtime`] or [`SagaError::Unavailable`].
    async fn saga<D: SagaData>(&self, def: SagaDefinition<D>) -> Result<SagaHandle<D>, SagaError>
    where
        Self: Sized;

    /// Runs `participant` on command channel `channel` under `policy`.
    ///
    /// # Errors
    /// [`SagaError::RetryBudget`] if `policy` may take longer on one command
    /// than a step of a saga registered on this runtime waits for it;
    /// runtime errors as [`SagaError::Runtime`] or [`SagaError::Unavailable`].
    async fn participant<P: Participant>(
        &self,
        channel: &str,
        policy: ParticipantPolicy,
        participant: P,
    ) -> Result<(), SagaError>
    where
        Self: Sized;

    /// Runs a projection: `handler` sees every message on `channels`, in
    /// order per partition, as consumer group `group`, at least once
    /// (deduplicate by [`Envelope::id`] if that matters).
    ///
    /// # Errors
    /// Runtime errors as [`SagaError::Runtime`] or [`SagaError::Unavailable`].
    async fn projection<F>(
        &self,
        group: &str,
        channels: &[&str],
        handler: F,
    ) -> Result<(), SagaError>
    where
        Self: Sized,
        F: FnMut(&Envelope) + Send + 'static;

    /// Writes `envelopes` as they are (each to its channel, keyed by its
    /// saga id), all or nothing where the runtime has transactions (in
    /// memory; Kafka exactly once): for operators and tools (a corrected
    /// command from a dead letter, a fallback event).
    ///
    /// # Errors
    /// [`SagaError::Unavailable`] if the runtime could not take them: with
    /// transactions nothing was written; without (Kafka at least once) some
    /// may have been, so retrying can write them twice.
    /// [`SagaError::Shutdown`] after shutdown.
    async fn publish(&self, envelopes: Vec<Envelope>) -> Result<(), SagaError>;

    /// Every dead letter on `channel`, oldest first.
    ///
    /// # Errors
    /// [`SagaError::Unavailable`] if the channel cannot be read now.
    async fn dead_letters(&self, channel: &str) -> Result<Vec<DeadLetter>, SagaError>;

    /// What does not work now: partitions that cannot be restored or
    /// written, the broker out of reach. Healthy when empty; serve it as
    /// a health check, so a stalled partition is seen.
    fn health(&self) -> Health;

    /// Finishes the work in hand (commits open batches), stops every
    /// worker and waits for them. Calls after it fail with
    /// [`SagaError::Shutdown`].
    async fn shutdown(&self);
}

/// What a runtime implements for one saga type; users hold it as a
/// [`SagaHandle`].
#[async_trait]
pub trait SagaService<D: SagaData>: Send + Sync + 'static {
    /// The saga definition.
    fn definition(&self) -> &SagaDefinition<D>;

    /// See [`SagaHandle::start`].
    async fn start(&self, id: SagaId, data: D) -> Result<SagaId, SagaError>;

    /// See [`SagaHandle::start_traced`]. The default ignores `parent` and
    /// calls [`SagaService::start`] (for services that keep no traces).
    async fn start_traced(
        &self,
        id: SagaId,
        data: D,
        parent: Option<TraceContext>,
    ) -> Result<SagaId, SagaError> {
        let _ = parent;
        self.start(id, data).await
    }

    /// See [`SagaHandle::get`].
    async fn get(&self, id: &SagaId) -> Result<Option<SagaInstance<D>>, SagaError>;

    /// See [`SagaHandle::list`].
    async fn list(&self, query: &SagaQuery) -> Result<Page<SagaInstance<D>>, SagaError>;

    /// See [`SagaHandle::operate`].
    async fn operate(&self, id: &SagaId, operation: Operation) -> Result<(), SagaError>;

    /// See [`SagaHandle::wait_settled`].
    async fn wait_settled(
        &self,
        id: &SagaId,
        timeout: Duration,
    ) -> Result<SagaInstance<D>, SagaError>;
}

/// The instances of one saga type on a runtime: start them, read them,
/// act on parked or stuck ones. Cheap to clone; the same type on every runtime.
pub struct SagaHandle<D> {
    service: Arc<dyn SagaService<D>>,
}

impl<D> Clone for SagaHandle<D> {
    fn clone(&self) -> Self {
        Self {
            service: self.service.clone(),
        }
    }
}

impl<D: SagaData> fmt::Debug for SagaHandle<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaHandle")
            .field("saga", &self.definition().name())
            .finish()
    }
}

impl<D: SagaData> SagaHandle<D> {
    /// A handle over a runtime's service (for runtime authors).
    pub fn new(service: impl SagaService<D>) -> Self {
        Self {
            service: Arc::new(service),
        }
    }

    /// The saga definition.
    pub fn definition(&self) -> &SagaDefinition<D> {
        self.service.definition()
    }

    /// Starts saga `id` with `data`: its state and its first messages are
    /// written atomically (on Kafka, in one transaction) by the worker that
    /// owns the saga's partition.
    ///
    /// Idempotent: if a saga `id` exists (in progress, or settled within
    /// the settled retention), nothing is written and the existing saga is
    /// kept, so a caller that did not hear back may start again with the
    /// same id (an HTTP API derives the id from an `Idempotency-Key`). On
    /// Kafka, when another instance owns the partition, this returns once
    /// the request is durable and the owner starts the saga as it reads it.
    ///
    /// # Errors
    /// [`SagaError::Unavailable`] if the runtime could not take the write
    /// in time (it may still be written: start again with the same id);
    /// [`SagaError::Encode`] if `data` cannot be serialized;
    /// [`SagaError::RecordTooLarge`] if its state or a first message would
    /// be over the record size limit; [`SagaError::CorruptState`] if saga
    /// `id` exists but its state record cannot be read (written by another
    /// build: a new saga would overwrite it); [`SagaError::Shutdown`] after
    /// shutdown. When another instance owns the partition, the owner
    /// refuses such a start itself: it dead-letters the start request with
    /// the reason.
    pub async fn start(&self, id: impl Into<SagaId>, data: D) -> Result<SagaId, SagaError> {
        self.service.start(id.into(), data).await
    }

    /// Like [`SagaHandle::start`], continuing trace `parent` (the caller's
    /// span, e.g. from an incoming W3C `traceparent` header): the saga's
    /// spans and messages join that trace. [`SagaHandle::start`] starts a
    /// new trace instead. A saga that exists already keeps its trace.
    ///
    /// ```
    /// # use saga_core::*;
    /// # async fn example(orders: SagaHandle<serde_json::Value>) -> Result<(), Box<dyn std::error::Error>> {
    /// let parent: TraceContext = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
    /// orders.start_traced("order-1", serde_json::json!({}), parent).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`SagaHandle::start`].
    pub async fn start_traced(
        &self,
        id: impl Into<SagaId>,
        data: D,
        parent: TraceContext,
    ) -> Result<SagaId, SagaError> {
        self.service
            .start_traced(id.into(), data, Some(parent))
            .await
    }

    /// The instance `id` as last committed, or `None`.
    ///
    /// # Errors
    /// [`SagaError::CorruptState`] if its stored state cannot be read;
    /// [`SagaError::Unavailable`] if the store cannot be read now.
    pub async fn get(&self, id: &SagaId) -> Result<Option<SagaInstance<D>>, SagaError> {
        self.service.get(id).await
    }

    /// The instances that match `query`, one page at a time (in id order).
    /// In memory it sees every instance; on Kafka, those of the partitions
    /// this process owns.
    ///
    /// A state record that cannot be read (written by a build whose data
    /// type no longer reads it) is left out of the pages and logged at
    /// warn level, on every runtime: one such saga does not hide the
    /// others. [`SagaHandle::get`] of its id returns
    /// [`SagaError::CorruptState`].
    ///
    /// # Errors
    /// [`SagaError::Unavailable`] as for [`SagaHandle::get`];
    /// [`SagaError::Shutdown`] on Kafka once the runtime has stopped.
    pub async fn list(&self, query: &SagaQuery) -> Result<Page<SagaInstance<D>>, SagaError> {
        self.service.list(query).await
    }

    /// Asks for `operation` on saga `id`, parked or stuck (see
    /// [`OperatorAction`](crate::OperatorAction)); it is recorded in the
    /// saga's history with the operator and the note. Returns once the
    /// request is durable; the saga's owner applies it in order with the
    /// saga's other inputs.
    ///
    /// # Errors
    /// [`SagaError::UnknownSaga`], [`SagaError::InvalidAction`] if the
    /// action does not apply ([`Operation::check`](crate::Operation::check)),
    /// [`SagaError::Unavailable`] if the request could not be
    /// written.
    pub async fn operate(&self, id: &SagaId, operation: Operation) -> Result<(), SagaError> {
        self.service.operate(id, operation).await
    }

    /// Waits until saga `id` is completed, compensated or parked, for at
    /// most `timeout`, and returns it.
    ///
    /// # Errors
    /// [`SagaError::WaitTimeout`] if it did not settle in time;
    /// [`SagaError::Shutdown`] if the runtime stopped.
    pub async fn wait_settled(
        &self,
        id: &SagaId,
        timeout: Duration,
    ) -> Result<SagaInstance<D>, SagaError> {
        self.service.wait_settled(id, timeout).await
    }
}

/// Which sagas a [`SagaQuery`] selects by status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StatusFilter {
    /// Running forward.
    Running,
    /// Compensating.
    Compensating,
    /// Completed.
    Completed,
    /// Compensated.
    Compensated,
    /// Parked for an operator.
    Parked,
    /// Not settled: running or compensating.
    Active,
    /// Completed or compensated.
    Final,
}

impl StatusFilter {
    /// Whether `instance`'s status passes.
    pub fn matches(self, status: &crate::SagaStatus) -> bool {
        use crate::SagaStatus as S;
        match self {
            StatusFilter::Running => matches!(status, S::Running),
            StatusFilter::Compensating => matches!(status, S::Compensating),
            StatusFilter::Completed => matches!(status, S::Completed),
            StatusFilter::Compensated => matches!(status, S::Compensated),
            StatusFilter::Parked => status.is_parked(),
            StatusFilter::Active => !status.is_settled(),
            StatusFilter::Final => status.is_final(),
        }
    }
}

impl std::str::FromStr for StatusFilter {
    type Err = String;

    /// `running`, `compensating`, `completed`, `compensated`, `parked`,
    /// `active` or `final`.
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "running" => StatusFilter::Running,
            "compensating" => StatusFilter::Compensating,
            "completed" => StatusFilter::Completed,
            "compensated" => StatusFilter::Compensated,
            "parked" => StatusFilter::Parked,
            "active" => StatusFilter::Active,
            "final" => StatusFilter::Final,
            other => {
                return Err(format!(
                    "unknown status `{other}` (running, compensating, completed, compensated, parked, active, final)"
                ))
            }
        })
    }
}

/// Which sagas [`SagaHandle::list`] returns: filters, and a page.
///
/// ```
/// use std::time::Duration;
/// use saga_core::{SagaQuery, StatusFilter};
/// // Parked for more than 5 minutes, 50 at a time.
/// let q = SagaQuery::all()
///     .status(StatusFilter::Parked)
///     .older_than(Duration::from_secs(300))
///     .limit(50);
/// assert_eq!(q.limit, 50);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SagaQuery {
    /// Only sagas in this status.
    pub status: Option<StatusFilter>,
    /// Only sagas at this step (running, compensating or parked on it).
    pub step: Option<String>,
    /// Only sagas whose last change is older than this.
    pub older_than: Option<Duration>,
    /// Only sagas whose id sorts after this one (the previous page's
    /// [`Page::next`]).
    pub after: Option<SagaId>,
    /// At most this many (default 100).
    pub limit: usize,
    /// Only the sagas this process's workers hold now (on Kafka: of the
    /// partitions it owns, without the saga type's catalog); in memory
    /// every saga is local.
    pub local: bool,
}

impl Default for SagaQuery {
    fn default() -> Self {
        Self::all()
    }
}

impl SagaQuery {
    /// Every saga, 100 at a time.
    pub fn all() -> Self {
        Self {
            status: None,
            step: None,
            older_than: None,
            after: None,
            limit: 100,
            local: false,
        }
    }

    /// Only sagas in `status`.
    pub fn status(mut self, status: StatusFilter) -> Self {
        self.status = Some(status);
        self
    }

    /// Only sagas at step `step`.
    pub fn step(mut self, step: impl Into<String>) -> Self {
        self.step = Some(step.into());
        self
    }

    /// Only sagas unchanged for longer than `age`.
    pub fn older_than(mut self, age: Duration) -> Self {
        self.older_than = Some(age);
        self
    }

    /// The page after the saga `id`.
    pub fn after(mut self, id: SagaId) -> Self {
        self.after = Some(id);
        self
    }

    /// Only the sagas this process's workers hold now ([`SagaQuery::local`]).
    pub fn local(mut self) -> Self {
        self.local = true;
        self
    }

    /// At most `n` sagas per page (at least 1).
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = n.max(1);
        self
    }

    /// Whether `instance` passes the filters (not the paging), at `now`.
    pub fn matches<D>(&self, instance: &SagaInstance<D>, now: Timestamp) -> bool {
        if let Some(status) = self.status {
            if !status.matches(&instance.status) {
                return false;
            }
        }
        if let Some(step) = &self.step {
            if instance.status.is_final() || instance.current_step() != Some(step.as_str()) {
                return false;
            }
        }
        if let Some(age) = self.older_than {
            if now.saturating_since(instance.updated_at) <= age {
                return false;
            }
        }
        true
    }

    /// Applies the query to `instances` (in any order) at `now`: the
    /// matching ones after [`SagaQuery::after`], in id order, at most
    /// [`SagaQuery::limit`], and where the next page starts.
    ///
    /// Only the instances on the page are copied.
    pub fn page<'a, D: Clone + 'a>(
        &self,
        instances: impl IntoIterator<Item = &'a SagaInstance<D>>,
        now: Timestamp,
    ) -> Page<SagaInstance<D>> {
        let mut items: Vec<&SagaInstance<D>> = instances
            .into_iter()
            .filter(|i| self.after.as_ref().is_none_or(|a| &i.id > a))
            .filter(|i| self.matches(i, now))
            .collect();
        items.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let next = if items.len() > self.limit {
            items.truncate(self.limit);
            items.last().map(|i| i.id.clone())
        } else {
            None
        };
        Page {
            items: items.into_iter().cloned().collect(),
            next,
            as_of: None,
        }
    }
}

/// One page of a [`SagaHandle::list`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Page<T> {
    /// The items, in id order.
    pub items: Vec<T>,
    /// Where the next page starts ([`SagaQuery::after`]), if there is one.
    pub next: Option<SagaId>,
    /// How fresh the listing is when it comes from a view that follows
    /// the runtime's storage at a distance (on Kafka: the last time every
    /// partition of the state topic had been read to its end); `None`
    /// when the listing is exact.
    pub as_of: Option<Timestamp>,
}

impl<T> Page<T> {
    /// The page, saying it is as fresh as `as_of`.
    pub fn with_as_of(mut self, as_of: Option<Timestamp>) -> Self {
        self.as_of = as_of;
        self
    }
}
