//! The librdkafka client contexts of the runtime: librdkafka's logs and
//! client errors go to `tracing` at their level (a broker that went away is
//! a warning, not an error per line), and producers remember the first
//! delivery that failed because of its record, so a batch that keeps
//! failing can be traced to the input that made that record.

use std::sync::{Arc, Mutex};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;

/// Logs librdkafka's messages and errors through `tracing`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Quiet;

pub(crate) fn log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    // A connection that failed (the broker restarting, away) is retried
    // by the client: a warning, reported once more as a client error.
    let level = match (level, fac) {
        (RDKafkaLogLevel::Error, "FAIL") => RDKafkaLogLevel::Warning,
        (level, _) => level,
    };
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", fac, "{message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

/// Client errors: the broker out of reach is expected now and then (a
/// restart, a failover) and retried by the client; it is a warning. The
/// end of a partition (readers ask to be told) is not an error at all.
pub(crate) fn client_error(error: KafkaError, reason: &str) {
    match error.rdkafka_error_code() {
        // Reaching a partition's end is how readers know they are done.
        Some(RDKafkaErrorCode::PartitionEOF) => {
            tracing::trace!(target: "librdkafka", %error, "{reason}")
        }
        Some(
            RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::Resolve,
        ) => tracing::warn!(target: "librdkafka", %error, "{reason}"),
        _ => tracing::error!(target: "librdkafka", %error, "{reason}"),
    }
}

impl ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log(level, fac, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(error, reason)
    }
}

impl ConsumerContext for Quiet {}

/// [`Quiet`], and the consumer's lag gauges set from its statistics (a
/// projection's consumer).
pub(crate) struct Lagging {
    lag: Mutex<crate::metrics::LagGauges>,
}

impl Lagging {
    /// The context of a consumer of `topics` in `group`.
    pub(crate) fn new(group: &str, topics: &[String]) -> Self {
        Self {
            lag: Mutex::new(crate::metrics::LagGauges::new(group, topics)),
        }
    }
}

impl ClientContext for Lagging {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log(level, fac, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(error, reason)
    }

    fn stats_raw(&self, statistics: &[u8]) {
        self.lag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .report(statistics);
    }
}

impl ConsumerContext for Lagging {}

/// The kind of resource an authorization error is about, if `code` is one.
pub(crate) fn denied(code: RDKafkaErrorCode) -> Option<&'static str> {
    match code {
        RDKafkaErrorCode::TopicAuthorizationFailed => Some("topic"),
        RDKafkaErrorCode::GroupAuthorizationFailed => Some("group"),
        RDKafkaErrorCode::TransactionalIdAuthorizationFailed => Some("transactional id"),
        RDKafkaErrorCode::ClusterAuthorizationFailed => Some("cluster"),
        _ => None,
    }
}

/// Whether `code` says the credentials or the TLS setup were refused.
pub(crate) fn unauthenticated(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::SSL
    )
}

/// Whether a produce error is the record's own fault: writing it again
/// will fail again, whatever the broker's state.
pub(crate) fn record_fault(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTimestamp
            | RDKafkaErrorCode::PolicyViolation
    )
}

/// A producer's context: remembers the first delivery of the open
/// transaction that failed because of its record, and the first that
/// failed at all.
#[derive(Clone, Debug, Default)]
pub(crate) struct Deliveries {
    /// The topic of the refused record, and why.
    pub(crate) fault: Arc<Mutex<Option<(String, String)>>>,
    /// The first topic the producer was not authorized to write to.
    pub(crate) denied: Arc<Mutex<Option<String>>>,
    /// The error of the first delivery that failed, whatever the cause.
    pub(crate) failed: Arc<Mutex<Option<RDKafkaErrorCode>>>,
}

impl Deliveries {
    /// Takes the fault recorded since the last call.
    pub(crate) fn take_fault(&self) -> Option<(String, String)> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Takes the topic the producer was refused since the last call.
    pub(crate) fn take_denied(&self) -> Option<String> {
        self.denied.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Takes the error of the first delivery that failed since the last
    /// call.
    pub(crate) fn take_failed(&self) -> Option<RDKafkaErrorCode> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl ClientContext for Deliveries {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // A transaction refused a topic: the client names it only here
        // (`Failed to add partition "t" [2] to transaction: Broker: Topic
        // authorization failed`), not in the error the commit returns.
        if fac == "ADDPARTS" && message.contains("Topic authorization failed") {
            if let Some(topic) = message.split('"').nth(1) {
                let mut denied = self.denied.lock().unwrap_or_else(|e| e.into_inner());
                denied.get_or_insert_with(|| topic.to_owned());
            }
        }
        log(level, fac, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(error, reason)
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let Err((error, message)) = result else {
            return;
        };
        let Some(code) = error.rdkafka_error_code() else {
            return;
        };
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(code);
        if code == RDKafkaErrorCode::TopicAuthorizationFailed {
            let mut denied = self.denied.lock().unwrap_or_else(|e| e.into_inner());
            denied.get_or_insert_with(|| message.topic().to_owned());
            return;
        }
        if record_fault(code) {
            let what = format!(
                "the broker refused a record for `{}` ({} bytes): {error}",
                message.topic(),
                message.payload().map_or(0, <[u8]>::len)
            );
            let mut fault = self.fault.lock().unwrap_or_else(|e| e.into_inner());
            fault.get_or_insert((message.topic().to_owned(), what));
        }
    }
}
