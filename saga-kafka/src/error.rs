//! The crate's error type.

/// Everything that can go wrong in the Kafka runtime.
///
/// Errors say what was being done and with which saga, topic or transactional id.
/// An [`Error::Transaction`] means nothing was written (the transaction was
/// aborted): the caller may retry. Through saga-core's API (a saga's
/// start, an operator's action, a publish) it arrives as
/// [`SagaError::Unavailable`](saga_core::SagaError::Unavailable) (an HTTP
/// handler maps it to 503).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is missing or invalid.
    #[error("invalid Kafka configuration `{key}`: {reason}")]
    Config {
        /// The setting (property or environment variable) at fault.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A Kafka client (producer, consumer, admin) could not be created or used.
    #[error("Kafka client error while {what}: {source}")]
    Client {
        /// What the runtime was doing.
        what: String,
        /// The client's error.
        #[source]
        source: Box<rdkafka::error::KafkaError>,
    },
    /// Creating or checking a topic failed.
    #[error("topic `{topic}`: {reason}")]
    Topic {
        /// The topic.
        topic: String,
        /// What went wrong.
        reason: String,
    },
    /// The broker did not take a transaction after bounded retries; it was
    /// aborted, so none of its messages became visible.
    #[error("transaction of `{transactional_id}` failed while {what} (aborted, nothing was written): {source}")]
    Transaction {
        /// The producer's transactional id.
        transactional_id: String,
        /// The step of the transaction that failed.
        what: String,
        /// The last client error.
        #[source]
        source: Box<rdkafka::error::KafkaError>,
    },
    /// The broker did not answer within the configured bound
    /// ([`KafkaConfig::request_timeout`](crate::KafkaConfig::request_timeout)).
    /// For a start, the saga may still start later: starting it again is safe.
    #[error("no answer while {what} within {after:?}: the broker may be out of reach")]
    TimedOut {
        /// What the runtime was doing.
        what: String,
        /// The bound.
        after: std::time::Duration,
    },
    /// The cluster did not accept this client's credentials (SASL) or the
    /// TLS handshake failed (certificate, CA): nothing works until the
    /// configuration is fixed.
    #[error("cannot authenticate to Kafka as {principal}: {reason}")]
    Authentication {
        /// Who the client tried to be (`User:<sasl.username>`, or what the
        /// configuration implies).
        principal: String,
        /// The client's words.
        reason: String,
    },
    /// The cluster's authorizer refused an operation: the principal needs
    /// an ACL ([`acl::AclPlan`](crate::acl::AclPlan) lists what each
    /// service needs).
    #[error("not authorized: {principal} may not {operation} {resource}: {reason}")]
    Authorization {
        /// The principal refused.
        principal: String,
        /// The operation refused (`CREATE`, `READ`, `WRITE`, `DESCRIBE_CONFIGS`).
        operation: String,
        /// The resource, e.g. ``topic `orders.state` ``.
        resource: String,
        /// The client's words.
        reason: String,
    },
    /// The runtime (or the worker serving this request) is shut down.
    #[error("the Kafka runtime is shut down")]
    Shutdown,
}

/// Shorthand for results with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn client(what: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        Error::Client {
            what: what.into(),
            source: Box::new(source),
        }
    }
}
