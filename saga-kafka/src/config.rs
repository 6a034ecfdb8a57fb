//! Client configuration: bootstrap servers, delivery mode, batching,
//! topic defaults and pass-through librdkafka properties (security included).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;

use crate::error::{Error, Result};

/// How the runtime delivers messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryMode {
    /// One transactional producer per service instance; `read_committed`
    /// consumers; the saga state, the messages a batch emits and the batch's
    /// input offsets commit or abort together (the default).
    #[default]
    ExactlyOnce,
    /// Idempotent producer with `acks=all`; offsets committed after the
    /// batch's output is flushed. A crash can deliver a message again:
    /// participants' deduplication makes that safe.
    AtLeastOnce,
}

/// The client's default `batch.size`: the most bytes of one record batch.
const CLIENT_BATCH_SIZE: usize = 1_000_000;

/// The environment variables [`KafkaConfig::from_env`] reads, and the
/// property each one sets.
const ENV_VARS: &[(&str, &str)] = &[
    ("KAFKA_SECURITY_PROTOCOL", "security.protocol"),
    ("KAFKA_SASL_MECHANISM", "sasl.mechanism"),
    ("KAFKA_SASL_USERNAME", "sasl.username"),
    ("KAFKA_SASL_PASSWORD", "sasl.password"),
    ("KAFKA_SSL_CA_LOCATION", "ssl.ca.location"),
    ("KAFKA_SSL_CERTIFICATE_LOCATION", "ssl.certificate.location"),
    ("KAFKA_SSL_KEY_LOCATION", "ssl.key.location"),
    ("KAFKA_SSL_KEY_PASSWORD", "ssl.key.password"),
    ("KAFKA_CLIENT_ID", "client.id"),
];

/// Runtime configuration. Build it with [`KafkaConfig::new`] and the
/// setters, or read it from the environment with [`KafkaConfig::from_env`].
///
/// Its `Debug` output never shows secrets: values of properties whose name
/// contains `password` or `secret`, and `sasl.jaas.config`, print as
/// `[redacted]`.
///
/// ```
/// use std::time::Duration;
/// use saga_kafka::{DeliveryMode, KafkaConfig};
///
/// let config = KafkaConfig::new("broker-1:9092,broker-2:9092")
///     .app("shop")
///     .instance_id("order-service-0")
///     .delivery(DeliveryMode::ExactlyOnce)
///     .batch(500, Duration::from_millis(100))
///     .partitions(3)
///     .replication_factor(3)
///     .set("security.protocol", "SASL_SSL")
///     .set("sasl.mechanism", "SCRAM-SHA-512")
///     .set("sasl.username", "order-service")
///     .set("sasl.password", "s3cret");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct KafkaConfig {
    pub(crate) bootstrap_servers: String,
    pub(crate) app: String,
    pub(crate) instance_id: String,
    pub(crate) transactional_id_prefix: Option<String>,
    pub(crate) delivery: DeliveryMode,
    pub(crate) batch_max_messages: usize,
    pub(crate) batch_timeout: Duration,
    pub(crate) batch_idle: Duration,
    pub(crate) start_linger: Duration,
    pub(crate) partitions: i32,
    pub(crate) replication_factor: i32,
    pub(crate) dead_letter_retention: Duration,
    pub(crate) transaction_timeout: Duration,
    pub(crate) message_timeout: Duration,
    pub(crate) session_timeout: Duration,
    pub(crate) static_membership: bool,
    pub(crate) request_timeout: Duration,
    pub(crate) restore_timeout: Duration,
    pub(crate) max_record_bytes: usize,
    pub(crate) settled_retention: Duration,
    pub(crate) max_retries: u32,
    pub(crate) retry_backoff: Duration,
    pub(crate) create_topics: bool,
    pub(crate) properties: BTreeMap<String, String>,
}

/// Whether a property's value is a secret that must never be shown.
pub(crate) fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k == "sasl.jaas.config" || k == "ssl.key.pem"
}

struct Redacted<'a>(&'a BTreeMap<String, String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown: &str = if is_secret(k) { "[redacted]" } else { v };
                (k, shown)
            }))
            .finish()
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("app", &self.app)
            .field("instance_id", &self.instance_id)
            .field("transactional_id_prefix", &self.transactional_id_prefix)
            .field("delivery", &self.delivery)
            .field("batch_max_messages", &self.batch_max_messages)
            .field("batch_timeout", &self.batch_timeout)
            .field("batch_idle", &self.batch_idle)
            .field("start_linger", &self.start_linger)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("dead_letter_retention", &self.dead_letter_retention)
            .field("transaction_timeout", &self.transaction_timeout)
            .field("message_timeout", &self.message_timeout)
            .field("session_timeout", &self.session_timeout)
            .field("static_membership", &self.static_membership)
            .field("request_timeout", &self.request_timeout)
            .field("restore_timeout", &self.restore_timeout)
            .field("max_record_bytes", &self.max_record_bytes)
            .field("settled_retention", &self.settled_retention)
            .field("max_retries", &self.max_retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("create_topics", &self.create_topics)
            .field("properties", &Redacted(&self.properties))
            .finish()
    }
}

impl KafkaConfig {
    /// A configuration for the cluster at `bootstrap_servers`
    /// (`host:port[,host:port…]`) with the defaults: exactly-once, app
    /// `saga`, instance id `0`, batches of up to 5,000 messages or 100 ms, 3
    /// partitions, replication factor 1, dead letters kept 30 days,
    /// transaction timeout 60 s, message timeout 30 s, session timeout 10 s,
    /// 5 retries 100 ms apart, topics created on registration.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            app: "saga".into(),
            instance_id: "0".into(),
            transactional_id_prefix: None,
            delivery: DeliveryMode::ExactlyOnce,
            batch_max_messages: 5_000,
            batch_timeout: Duration::from_millis(100),
            batch_idle: Duration::from_millis(1),
            start_linger: Duration::from_millis(10),
            partitions: 3,
            replication_factor: 1,
            dead_letter_retention: Duration::from_secs(30 * 24 * 3600),
            transaction_timeout: Duration::from_secs(60),
            message_timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(10),
            static_membership: true,
            request_timeout: Duration::from_secs(5),
            restore_timeout: Duration::from_secs(60),
            max_record_bytes: saga_core::driver::DEFAULT_MAX_RECORD_BYTES,
            settled_retention: saga_core::driver::DEFAULT_SETTLED_RETENTION,
            max_retries: 5,
            retry_backoff: Duration::from_millis(100),
            create_topics: true,
            properties: BTreeMap::new(),
        }
    }

    /// Reads the configuration from the process environment.
    ///
    /// # Errors
    /// [`Error::Config`] naming the variable that is missing
    /// (`KAFKA_BOOTSTRAP_SERVERS`) or invalid.
    ///
    /// `KAFKA_BOOTSTRAP_SERVERS` is required. Optional: `SAGA_APP`,
    /// `SAGA_INSTANCE_ID`, `SAGA_TRANSACTIONAL_ID_PREFIX`, `SAGA_DELIVERY`
    /// (`exactly-once` or `at-least-once`), `KAFKA_PARTITIONS`,
    /// `KAFKA_REPLICATION_FACTOR`, `KAFKA_SESSION_TIMEOUT_MS`,
    /// `SAGA_REQUEST_TIMEOUT_MS`, `SAGA_STATIC_MEMBERSHIP` (`true` or
    /// `false`), `SAGA_MAX_RECORD_BYTES`, `SAGA_SETTLED_RETENTION_SECS`
    /// (see the setters of the same names), and these client properties:
    ///
    /// | variable | property |
    /// |---|---|
    /// | `KAFKA_SECURITY_PROTOCOL` | `security.protocol` |
    /// | `KAFKA_SASL_MECHANISM` | `sasl.mechanism` |
    /// | `KAFKA_SASL_USERNAME` | `sasl.username` |
    /// | `KAFKA_SASL_PASSWORD` | `sasl.password` |
    /// | `KAFKA_SSL_CA_LOCATION` | `ssl.ca.location` |
    /// | `KAFKA_SSL_CERTIFICATE_LOCATION` | `ssl.certificate.location` |
    /// | `KAFKA_SSL_KEY_LOCATION` | `ssl.key.location` |
    /// | `KAFKA_SSL_KEY_PASSWORD` | `ssl.key.password` |
    /// | `KAFKA_CLIENT_ID` | `client.id` |
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Like [`KafkaConfig::from_env`], reading variables through `lookup`.
    ///
    /// # Errors
    /// As [`KafkaConfig::from_env`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let servers = lookup("KAFKA_BOOTSTRAP_SERVERS").ok_or_else(|| Error::Config {
            key: "KAFKA_BOOTSTRAP_SERVERS".into(),
            reason: "not set".into(),
        })?;
        let mut c = Self::new(servers);
        if let Some(v) = lookup("SAGA_APP") {
            c.app = v;
        }
        if let Some(v) = lookup("SAGA_INSTANCE_ID") {
            c.instance_id = v;
        }
        if let Some(v) = lookup("SAGA_TRANSACTIONAL_ID_PREFIX") {
            c.transactional_id_prefix = Some(v);
        }
        if let Some(v) = lookup("SAGA_DELIVERY") {
            c.delivery = match v.to_ascii_lowercase().replace('_', "-").as_str() {
                "exactly-once" => DeliveryMode::ExactlyOnce,
                "at-least-once" => DeliveryMode::AtLeastOnce,
                other => {
                    return Err(Error::Config {
                        key: "SAGA_DELIVERY".into(),
                        reason: format!("`{other}` is not `exactly-once` or `at-least-once`"),
                    })
                }
            };
        }
        let int = |key: &str| -> Result<Option<i32>> {
            lookup(key)
                .map(|v| {
                    v.parse::<i32>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| Error::Config {
                            key: key.into(),
                            reason: format!("`{v}` is not a positive integer"),
                        })
                })
                .transpose()
        };
        if let Some(n) = int("KAFKA_PARTITIONS")? {
            c.partitions = n;
        }
        if let Some(n) = int("KAFKA_REPLICATION_FACTOR")? {
            c.replication_factor = n;
        }
        let millis = |n: i32| Duration::from_millis(u64::from(n.unsigned_abs()));
        if let Some(n) = int("KAFKA_SESSION_TIMEOUT_MS")? {
            c.session_timeout = millis(n);
        }
        if let Some(n) = int("SAGA_REQUEST_TIMEOUT_MS")? {
            c.request_timeout = millis(n);
        }
        if let Some(n) = int("SAGA_MAX_RECORD_BYTES")? {
            c.max_record_bytes = n.unsigned_abs() as usize;
        }
        if let Some(n) = int("SAGA_SETTLED_RETENTION_SECS")? {
            c.settled_retention = Duration::from_secs(u64::from(n.unsigned_abs()));
        }
        if let Some(v) = lookup("SAGA_STATIC_MEMBERSHIP") {
            c.static_membership = match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                other => {
                    return Err(Error::Config {
                        key: "SAGA_STATIC_MEMBERSHIP".into(),
                        reason: format!("`{other}` is not `true` or `false`"),
                    })
                }
            };
        }
        for (var, prop) in ENV_VARS {
            if let Some(v) = lookup(var) {
                c.properties.insert((*prop).into(), v);
            }
        }
        Ok(c)
    }

    /// The application name: prefix of transactional ids (default `saga`).
    pub fn app(mut self, app: impl Into<String>) -> Self {
        self.app = app.into();
        self
    }

    /// This process's instance id: unique per live instance of a service
    /// and stable across its restarts (e.g. a StatefulSet ordinal), so a
    /// restarted instance fences its previous incarnation.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = id.into();
        self
    }

    /// Overrides the prefix of transactional ids (default: the app name).
    /// The id of a service's producer is `<prefix>-<service>-<instance id>`.
    pub fn transactional_id_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.transactional_id_prefix = Some(prefix.into());
        self
    }

    /// Exactly-once (default) or at-least-once.
    pub fn delivery(mut self, mode: DeliveryMode) -> Self {
        self.delivery = mode;
        self
    }

    /// A batch (one transaction) ends after `max_messages` messages or
    /// `timeout` (defaults 5,000 and 100 ms), or earlier when no more input
    /// arrives within [`KafkaConfig::batch_idle`].
    pub fn batch(mut self, max_messages: usize, timeout: Duration) -> Self {
        self.batch_max_messages = max_messages.max(1);
        self.batch_timeout = timeout;
        self
    }

    /// How long an open batch waits for more input before it commits
    /// (default 1 ms): batches take what has arrived, so they stay small
    /// (low latency) when the load is light and grow up to
    /// [`KafkaConfig::batch`]'s bounds under load, without tuning. A longer
    /// wait makes fewer, larger transactions at light load.
    pub fn batch_idle(mut self, idle: Duration) -> Self {
        self.batch_idle = idle;
        self
    }

    /// Exactly once, `start()` and `operate()` calls join the open batch's
    /// transaction (many starts share one commit); a batch that has callers
    /// waiting stops waiting for more input `linger` after the first of them
    /// joined, even if its own timeout is longer (default 10 ms, never more
    /// than the batch timeout), and commits once it has taken the input
    /// already received (within [`KafkaConfig::batch`]'s bounds: replies
    /// are not starved by a stream of starts, whatever the linger). Under a
    /// steady load a caller may so wait up to the batch timeout; keep that
    /// shorter than [`KafkaConfig::request_timeout`] (a warning says so
    /// when clients are created). At least once, the calls do not join a
    /// batch and the linger does not apply: they run in a flush of their
    /// own once the open batch ends, and a batch with calls waiting ends as
    /// soon as no more input is queued (or at [`KafkaConfig::batch`]'s
    /// bounds, if input keeps coming).
    pub fn start_linger(mut self, linger: Duration) -> Self {
        self.start_linger = linger;
        self
    }

    /// Partitions of the topics the runtime creates (default 3).
    pub fn partitions(mut self, n: i32) -> Self {
        self.partitions = n.max(1);
        self
    }

    /// Replication factor of the topics the runtime creates (default 1; use 3 in production).
    pub fn replication_factor(mut self, n: i32) -> Self {
        self.replication_factor = n.max(1);
        self
    }

    /// How long dead-letter topics keep their messages (default 30 days).
    pub fn dead_letter_retention(mut self, d: Duration) -> Self {
        self.dead_letter_retention = d;
        self
    }

    /// `transaction.timeout.ms` and `message.timeout.ms`; the message
    /// timeout must be shorter (checked when clients are created).
    pub fn timeouts(mut self, transaction: Duration, message: Duration) -> Self {
        self.transaction_timeout = transaction;
        self.message_timeout = message;
        self
    }

    /// The consumer group session timeout (default 10 s): how long the
    /// group waits for a member that stopped heartbeating (a crashed
    /// process) before its partitions move to the others. The broker
    /// bounds it (`group.min.session.timeout.ms`, 6 s by default).
    pub fn session_timeout(mut self, d: Duration) -> Self {
        self.session_timeout = d;
        self
    }

    /// Static group membership (default on): each consumer joins with
    /// `group.instance.id` `<prefix>-<group>-<instance id>`, so a process
    /// that restarts with the same instance id within the session timeout
    /// gets its partitions back without a rebalance of the others. The
    /// flip side: a static member that stops, even cleanly, keeps its
    /// partitions until the session timeout ends. Instance ids must be
    /// unique per process (they already are for the transactional ids).
    pub fn static_membership(mut self, on: bool) -> Self {
        self.static_membership = on;
        self
    }

    /// How long an API call (a saga's start, an operator's action, a
    /// publish, a read from the broker) waits for the broker before it
    /// fails with [`SagaError::Unavailable`](saga_core::SagaError::Unavailable)
    /// (default 5 s). A start that timed out may still take effect later;
    /// starting the same id again is safe (starts are idempotent).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// How long reading back one partition set's state (at assignment)
    /// may take before it is retried later (default 60 s).
    pub fn restore_timeout(mut self, d: Duration) -> Self {
        self.restore_timeout = d;
        self
    }

    /// The largest record the runtime writes, key and value (default
    /// [`DEFAULT_MAX_RECORD_BYTES`](saga_core::driver::DEFAULT_MAX_RECORD_BYTES)):
    /// keep it at or below the broker's and topics' `max.message.bytes`.
    /// Bigger dead letters are truncated; a saga state or reply over it is
    /// refused (the input that made it is dead-lettered). Below 1 MB it
    /// also bounds the producers' record batches (`batch.size`, unless set
    /// with [`set`](Self::set)): a topic's `max.message.bytes` applies to
    /// a whole batch.
    pub fn max_record_bytes(mut self, bytes: usize) -> Self {
        self.max_record_bytes = bytes;
        self
    }

    /// How long a settled saga's final state stays readable before a
    /// tombstone deletes it (default
    /// [`DEFAULT_SETTLED_RETENTION`](saga_core::driver::DEFAULT_SETTLED_RETENTION)).
    /// A start of the same id within it returns the settled saga; keep it
    /// longer than the `dedupe_horizon` of every participant the saga
    /// calls, plus how late they may handle its commands (a start after it
    /// is a new saga whose commands reuse the old ids, which a participant
    /// still remembering them answers from its ledger).
    pub fn settled_retention(mut self, d: Duration) -> Self {
        self.settled_retention = d;
        self
    }

    /// Retries of a retriable transaction call, and the pause between them.
    pub fn retries(mut self, max_retries: u32, backoff: Duration) -> Self {
        self.max_retries = max_retries;
        self.retry_backoff = backoff;
        self
    }

    /// Whether registering a saga, participant or projection creates its
    /// topics (default `true`).
    pub fn create_topics(mut self, on: bool) -> Self {
        self.create_topics = on;
        self
    }

    /// Sets a librdkafka property on every client (security settings,
    /// `client.id`, tuning). It overrides the runtime's tuning defaults
    /// (producers: `linger.ms=1`, `retry.backoff.ms=2`,
    /// `delivery.report.only.error=true`; the readers of
    /// state topics and ledgers: `queued.max.messages.kbytes=16384`,
    /// `fetch.queue.backoff.ms=1`, and `fetch.wait.max.ms=10` for reads to
    /// the end, such as restores), for every client it applies to: a
    /// longer `fetch.wait.max.ms` set for the long-lived consumers also
    /// makes every restore wait that long at its end. Properties the
    /// runtime needs for its delivery guarantees (idempotence, acks,
    /// transactional id, isolation level, auto commit) are set after these
    /// and win.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// The bootstrap servers.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// The delivery mode.
    pub fn delivery_mode(&self) -> DeliveryMode {
        self.delivery
    }

    /// The transactional id of `service`'s producer on this instance.
    pub fn transactional_id(&self, service: &str) -> String {
        format!(
            "{}-{service}-{}",
            self.transactional_id_base(),
            self.instance_id
        )
    }

    /// The principal this configuration authenticates as, for messages:
    /// `User:<sasl.username>`, or a description when there is none.
    pub(crate) fn principal(&self) -> String {
        match self.properties.get("sasl.username") {
            Some(u) => format!("User:{u}"),
            None if self.properties.contains_key("ssl.certificate.location") => {
                "the principal of this client's TLS certificate".into()
            }
            None => "this client's principal".into(),
        }
    }

    /// What transactional ids start with: the prefix, else the app name.
    pub(crate) fn transactional_id_base(&self) -> &str {
        self.transactional_id_prefix.as_deref().unwrap_or(&self.app)
    }

    /// The group restores and topic reads use (they never commit in it).
    pub(crate) fn reader_group(&self) -> String {
        format!("{}-reader", self.app)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(Error::Config {
                key: "bootstrap.servers".into(),
                reason: "empty".into(),
            });
        }
        if self.delivery == DeliveryMode::ExactlyOnce
            && self.message_timeout >= self.transaction_timeout
        {
            return Err(Error::Config {
                key: "message.timeout.ms".into(),
                reason: format!(
                    "{:?} must be shorter than transaction.timeout.ms ({:?})",
                    self.message_timeout, self.transaction_timeout
                ),
            });
        }
        if self.batch_timeout >= self.request_timeout {
            // Allowed, but a start can then time out while its batch, busy
            // with input already received, has not committed yet.
            tracing::warn!(
                batch_timeout = ?self.batch_timeout,
                request_timeout = ?self.request_timeout,
                "the batch timeout is not shorter than the request timeout: under load, starts may time out before their batch commits"
            );
        }
        Ok(())
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    pub(crate) fn admin_config(&self) -> ClientConfig {
        self.base()
    }

    /// A producer: transactional (with `transactional_id`) or idempotent.
    pub(crate) fn producer_config(&self, transactional_id: Option<&str>) -> ClientConfig {
        let mut c = self.base();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            // Java-compatible key hashing, so every client maps a saga id to
            // the same partition of co-partitioned topics.
            .set("partitioner", "murmur2_random")
            .set(
                "message.timeout.ms",
                self.message_timeout.as_millis().to_string(),
            );
        // Tuning defaults, chosen by measurement (`KafkaConfig::set`
        // overrides them):
        // - the commit waits for a batch's records (exactly once they are
        //   all produced at the commit), so lingering only delays the
        //   commit (the client's default is 5 ms);
        // - retries inside a transaction are short waits: above all the
        //   CONCURRENT_TRANSACTIONS answered to a transaction's offsets
        //   while the coordinator still writes the previous commit's
        //   markers, which takes a millisecond or two. The client's 100 ms
        //   default stalls every such batch by that much, and 10 ms was
        //   mostly waiting; the client backs off exponentially from this
        //   value for a retry that keeps failing.
        let user_set = |keys: &[&str]| keys.iter().any(|k| self.properties.contains_key(*k));
        if !user_set(&["linger.ms", "queue.buffering.max.ms"]) {
            c.set("linger.ms", "1");
        }
        if !user_set(&["retry.backoff.ms"]) {
            c.set("retry.backoff.ms", "2");
        }
        // A topic's `max.message.bytes` bounds a whole record batch, not a
        // record, and the client does not split a batch the broker
        // refuses: the batches stay within `max_record_bytes`, so a topic
        // that takes the largest record takes every batch of small ones
        // (above it, the client's own 1 MB default stays).
        if !user_set(&["batch.size"]) && self.max_record_bytes < CLIENT_BATCH_SIZE {
            c.set("batch.size", self.max_record_bytes.max(1).to_string());
        }
        // Record batches compressed with LZ4: a saga's records are JSON
        // whose names and ids repeat, and the bytes a broker stores,
        // replicates and serves cost it CPU, disk and network. In a burst
        // of 40,000 sagas with the broker on the same 2-core box (six runs
        // each, alternated): a third less broker CPU per saga, about a
        // tenth more sagas per second, the same client CPU (medians).
        if !user_set(&["compression.type", "compression.codec"]) {
            c.set("compression.type", "lz4");
        }
        // Only failures need a delivery report: a commit waits for the
        // client's count of messages in flight, not for reports.
        if !user_set(&["delivery.report.only.error"]) {
            c.set("delivery.report.only.error", "true");
        }
        if let Some(id) = transactional_id {
            c.set("transactional.id", id).set(
                "transaction.timeout.ms",
                self.transaction_timeout.as_millis().to_string(),
            );
        }
        c
    }

    /// A group consumer: manual commits, `read_committed`.
    pub(crate) fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        if self.static_membership {
            let prefix = self.transactional_id_prefix.as_deref().unwrap_or(&self.app);
            c.set(
                "group.instance.id",
                format!("{prefix}-{group}-{}", self.instance_id),
            );
        }
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            // Range assignment gives one member the same partition number of
            // every subscribed topic (co-partitioning), which the runtime
            // relies on: a saga's replies and its state share a partition
            // number and one owner. Cooperative-sticky assignment keeps no
            // such guarantee, so it is not used; static membership spares
            // restarts the rebalance instead.
            .set("partition.assignment.strategy", "range")
            .set(
                "session.timeout.ms",
                self.session_timeout.as_millis().to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (self.session_timeout.as_millis() / 4).max(100).to_string(),
            );
        // The statistics the lag gauges come from, unless set otherwise
        // (`KafkaConfig::set("statistics.interval.ms", "0")`: none).
        if !self.properties.contains_key("statistics.interval.ms") {
            c.set(
                "statistics.interval.ms",
                crate::metrics::LAG_INTERVAL_MS.to_string(),
            );
        }
        c
    }

    /// A consumer that reads assigned partitions to their end (state restore).
    pub(crate) fn reader_config(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", self.reader_group())
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true");
        // The records are handled as they arrive: a deep prefetch queue
        // (64 MB by default) only raises the restore's memory peak; with a
        // short one, fetching must not back off for a second each time it
        // fills. (`KafkaConfig::set` overrides both.)
        for (key, value) in [
            ("queued.max.messages.kbytes", "16384"),
            ("fetch.queue.backoff.ms", "1"),
        ] {
            if !self.properties.contains_key(key) {
                c.set(key, value);
            }
        }
        c
    }

    /// The configuration of a reader that reads a topic to its end and
    /// stops (restores, admin reads): [`KafkaConfig::reader_config`], with
    /// fetches that wait at most 10 ms for data. The end of a partition is
    /// known when a fetch returns nothing new, and librdkafka's default
    /// (500 ms) made every read to the end wait that long, an empty
    /// partition's too. (`KafkaConfig::set` overrides it.)
    pub(crate) fn read_to_end_config(&self) -> ClientConfig {
        let mut c = self.reader_config();
        if !self.properties.contains_key("fetch.wait.max.ms") {
            c.set("fetch.wait.max.ms", "10");
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_properties_set_by_the_user_win_but_guarantees_do_not() {
        let c = KafkaConfig::new("b:9092")
            .set("linger.ms", "0")
            .set("acks", "1");
        let p = c.producer_config(Some("tx"));
        assert_eq!(p.get("linger.ms"), Some("0"));
        assert_eq!(p.get("retry.backoff.ms"), Some("2"), "the default stays");
        assert_eq!(p.get("delivery.report.only.error"), Some("true"));
        let reports = c.clone().set("delivery.report.only.error", "false");
        assert_eq!(
            reports
                .producer_config(None)
                .get("delivery.report.only.error"),
            Some("false")
        );
        assert_eq!(p.get("acks"), Some("all"), "the runtime's guarantee wins");
        assert_eq!(p.get("transactional.id"), Some("tx"));
    }

    #[test]
    fn record_batches_stay_within_a_lower_max_record_bytes_unless_the_user_says() {
        let c = KafkaConfig::new("b:9092");
        assert_eq!(c.producer_config(None).get("batch.size"), None, "default");
        let low = c.clone().max_record_bytes(64_000);
        assert_eq!(low.producer_config(None).get("batch.size"), Some("64000"));
        let high = c.clone().max_record_bytes(4_000_000);
        assert_eq!(high.producer_config(None).get("batch.size"), None);
        let set = low.set("batch.size", "16384");
        assert_eq!(set.producer_config(None).get("batch.size"), Some("16384"));
    }

    #[test]
    fn producers_compress_with_lz4_unless_the_user_says() {
        let c = KafkaConfig::new("b:9092");
        assert_eq!(c.producer_config(None).get("compression.type"), Some("lz4"));
        assert_eq!(
            c.producer_config(Some("t")).get("compression.type"),
            Some("lz4")
        );
        for key in ["compression.type", "compression.codec"] {
            let set = c.clone().set(key, "none");
            let p = set.producer_config(None);
            assert_eq!(p.get(key), Some("none"), "{key}");
            if key != "compression.type" {
                assert_eq!(p.get("compression.type"), None, "{key}");
            }
        }
        // Consumers have nothing to compress.
        assert_eq!(c.consumer_config("g").get("compression.type"), None);
    }

    #[test]
    fn only_reads_to_the_end_wait_briefly_for_fetches_unless_the_user_says() {
        let c = KafkaConfig::new("b:9092");
        assert_eq!(c.read_to_end_config().get("fetch.wait.max.ms"), Some("10"));
        // The long-lived consumers keep the client's default.
        assert_eq!(c.reader_config().get("fetch.wait.max.ms"), None);
        assert_eq!(c.consumer_config("g").get("fetch.wait.max.ms"), None);
        let set = c.set("fetch.wait.max.ms", "100");
        assert_eq!(
            set.read_to_end_config().get("fetch.wait.max.ms"),
            Some("100")
        );
    }

    #[test]
    fn from_lookup_reads_security_settings() {
        let env = [
            ("KAFKA_BOOTSTRAP_SERVERS", "b:9093"),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("KAFKA_SASL_USERNAME", "orders"),
            ("KAFKA_SASL_PASSWORD", "hunter2"),
            ("SAGA_DELIVERY", "at-least-once"),
            ("KAFKA_PARTITIONS", "6"),
            ("SAGA_REQUEST_TIMEOUT_MS", "2500"),
            ("SAGA_STATIC_MEMBERSHIP", "false"),
        ];
        let c = KafkaConfig::from_lookup(|k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        })
        .unwrap();
        assert_eq!(c.bootstrap_servers(), "b:9093");
        assert_eq!(c.delivery_mode(), DeliveryMode::AtLeastOnce);
        assert_eq!(c.partitions, 6);
        assert_eq!(c.properties["sasl.password"], "hunter2");
        assert_eq!(c.properties["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(c.request_timeout, Duration::from_millis(2500));
        assert!(!c.static_membership);
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn from_lookup_requires_bootstrap_servers() {
        let err = KafkaConfig::from_lookup(|_| None).unwrap_err();
        assert!(err.to_string().contains("KAFKA_BOOTSTRAP_SERVERS"));
    }

    #[test]
    fn message_timeout_must_be_below_transaction_timeout() {
        let c = KafkaConfig::new("x:1").timeouts(Duration::from_secs(5), Duration::from_secs(10));
        assert!(c.validate().is_err());
    }
}
