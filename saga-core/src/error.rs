//! The crate's error type.

use crate::ids::{MessageId, SagaId};

/// Everything that can go wrong in the engine and the in-memory runtime.
///
/// Errors name what was wrong and with which saga, step or message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// A saga definition has no steps.
    #[error("saga definition `{saga}` has no steps")]
    EmptyDefinition {
        /// The saga type's name.
        saga: String,
    },
    /// A saga definition has more than one pivot step.
    #[error("saga definition `{saga}` has two pivot steps: `{first}` and `{second}`")]
    MultiplePivots {
        /// The saga type's name.
        saga: String,
        /// The first pivot.
        first: String,
        /// The second pivot.
        second: String,
    },
    /// Steps are not in the order compensatable*, pivot?, retryable*.
    #[error("saga definition `{saga}`: step `{step}` is {kind} but comes after the point of no return `{after}`; only retryable steps may follow a pivot or a retryable step")]
    StepOrder {
        /// The saga type's name.
        saga: String,
        /// The misplaced step.
        step: String,
        /// The misplaced step's kind.
        kind: String,
        /// The pivot or retryable step it follows.
        after: String,
    },
    /// Two steps share a name.
    #[error("saga definition `{saga}` has two steps named `{step}`")]
    DuplicateStep {
        /// The saga type's name.
        saga: String,
        /// The repeated name.
        step: String,
    },
    /// A remote step was built without a command.
    #[error("saga definition `{saga}`: remote step `{step}` has no command (call `.command(..)`)")]
    IncompleteStep {
        /// The saga type's name.
        saga: String,
        /// The step missing its command.
        step: String,
    },
    /// A step's options do not fit together (e.g. a compensatable step set
    /// to continue after giving up).
    #[error("saga definition `{saga}`: step `{step}`: {reason}")]
    InvalidStep {
        /// The saga type's name.
        saga: String,
        /// The step.
        step: String,
        /// What is wrong.
        reason: String,
    },
    /// A step's per-attempt timeout is shorter than the time its
    /// participant may spend on one command (its whole retry budget), so
    /// the step would give up on attempts the participant is still working on.
    #[error("saga `{saga}`: step `{step}` times out after {timeout:?}, but participant `{participant}` may take up to {budget:?} on one command ({attempts} attempt(s)); raise the step's timeout or lower the participant's retries")]
    RetryBudget {
        /// The saga type's name.
        saga: String,
        /// The step.
        step: String,
        /// The step's per-attempt timeout.
        timeout: std::time::Duration,
        /// The participant.
        participant: String,
        /// The participant's worst-case time for one command.
        budget: std::time::Duration,
        /// The participant's attempts per command.
        attempts: u32,
    },
    /// A record (a saga's state, a message) would be larger than the
    /// runtime writes; the input that made it is dead-lettered instead.
    #[error(
        "a record of {size} bytes for `{topic}` (key `{key}`) is over the limit of {limit} bytes"
    )]
    RecordTooLarge {
        /// The topic it was for.
        topic: String,
        /// Its key.
        key: String,
        /// Its size (key and value).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A saga type or participant of this name is already registered on
    /// the runtime.
    #[error("`{name}` is already registered on this runtime (saga types and participants need distinct names)")]
    AlreadyRegistered {
        /// The name.
        name: String,
    },
    /// A retry policy has an invalid field.
    #[error("invalid retry policy: {reason}")]
    InvalidPolicy {
        /// What is wrong.
        reason: String,
    },
    /// A message names a saga that does not exist.
    #[error("no saga instance `{saga_id}` (message `{message_id}`)")]
    UnknownSaga {
        /// The saga id the message carried.
        saga_id: SagaId,
        /// The message.
        message_id: MessageId,
    },
    /// A message was addressed to a different saga type or instance.
    #[error("message `{message_id}` is for saga type `{found}`, not `{expected}`")]
    WrongSaga {
        /// The saga type that received it.
        expected: String,
        /// The saga type it names.
        found: String,
        /// The message.
        message_id: MessageId,
    },
    /// A message is not of the kind expected here (e.g. a command given as a reply).
    #[error("message `{message_id}` is a {found}, expected a {expected}")]
    WrongMessageKind {
        /// The message.
        message_id: MessageId,
        /// The kind expected.
        expected: &'static str,
        /// The kind found.
        found: &'static str,
    },
    /// A reply names a step the saga definition does not have.
    #[error("saga `{saga_id}` has no step `{step}` (message `{message_id}`)")]
    UnknownStep {
        /// The saga id.
        saga_id: SagaId,
        /// The step named by the message.
        step: String,
        /// The message.
        message_id: MessageId,
    },
    /// A stored saga does not fit its definition: it was recorded by a
    /// definition with other steps (a deployment changed them while it
    /// was in progress), or its record was edited. The engine handles no
    /// input for it; the runtime dead-letters the input.
    #[error("saga `{saga_id}` does not fit its definition: {reason}")]
    DefinitionMismatch {
        /// The saga id.
        saga_id: SagaId,
        /// What differs.
        reason: String,
    },
    /// The saga's own code (a step's closure: a command, a reply handler,
    /// a local step, a compensation) panicked while handling an input.
    /// The instance is left as it was; the runtime dead-letters the input
    /// (or refuses the start).
    #[error("saga `{saga_id}`: its code panicked: {message}")]
    Panicked {
        /// The saga id.
        saga_id: SagaId,
        /// The panic's message.
        message: String,
    },
    /// A payload could not be decoded into the expected type.
    #[error("saga `{saga_id}`, step `{step}`: cannot decode {what}: {source}")]
    Decode {
        /// The saga id.
        saga_id: SagaId,
        /// The step.
        step: String,
        /// What was being decoded (e.g. "reply").
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// A value could not be encoded.
    #[error("saga `{saga_id}`: cannot encode {what}: {source}")]
    Encode {
        /// The saga id.
        saga_id: SagaId,
        /// What was being encoded (e.g. "command of step `reserve`").
        what: String,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// An operator action does not apply in the saga's current state.
    #[error("saga `{saga_id}`: cannot {action} while {status}")]
    InvalidAction {
        /// The saga id.
        saga_id: SagaId,
        /// The action attempted.
        action: String,
        /// The saga's status.
        status: String,
    },
    /// A stored saga instance could not be read back.
    #[error("stored saga `{saga_id}` is corrupt: {source}")]
    CorruptState {
        /// The saga id.
        saga_id: SagaId,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// The runtime is shutting down or was dropped.
    #[error("the runtime is shut down")]
    Shutdown,
    /// Waiting for a saga to reach a state took longer than allowed.
    #[error("timed out waiting for saga `{saga_id}`")]
    WaitTimeout {
        /// The saga id.
        saga_id: SagaId,
    },
    /// The runtime could not carry out the request now (a broker out of
    /// reach, a transaction it did not take, no answer within the
    /// runtime's bound): the same request may succeed later. A refused
    /// transaction wrote nothing; a request that timed out may still take
    /// effect, so retry only what is idempotent (a start of the same id, a
    /// read).
    #[error("{what}: {source}")]
    Unavailable {
        /// What the runtime was doing.
        what: String,
        /// The runtime's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The runtime refused the request for a reason retrying does not fix
    /// (its configuration, an authorization, a topic it cannot create).
    #[error("{what}: {source}")]
    Runtime {
        /// What the runtime was doing.
        what: String,
        /// The runtime's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SagaError {
    /// Whether the same request may succeed if made again later
    /// ([`SagaError::Unavailable`], [`SagaError::WaitTimeout`]): an HTTP
    /// API answers 503 with `Retry-After` for these.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SagaError::Unavailable { .. } | SagaError::WaitTimeout { .. }
        )
    }
}

/// Shorthand for results with [`SagaError`].
pub type Result<T, E = SagaError> = std::result::Result<T, E>;

/// The message a panic was raised with (its `&str` or `String` payload).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
