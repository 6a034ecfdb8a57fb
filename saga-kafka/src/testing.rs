//! Test support for sagas on a real broker (feature `testing`).
//!
//! [`KafkaFixture`] gives each test its own namespace on a shared broker
//! (topics, consumer groups and transactional ids under a random prefix),
//! a test-friendly [`KafkaConfig`], and an independent `read_committed`
//! reader to check what was really committed.
//!
//! ```no_run
//! # async fn demo() {
//! use saga_kafka::testing::KafkaFixture;
//! use saga_kafka::KafkaRuntime;
//!
//! let fx = KafkaFixture::new(); // KAFKA_BOOTSTRAP_SERVERS, a fresh namespace
//! let runtime = KafkaRuntime::new(fx.config("instance-0")).unwrap();
//! // … register sagas on fx.topic("order.replies") and friends, run them …
//! let committed = fx.read_committed(&fx.topic("orders.events"));
//! # let _ = (runtime, committed);
//! # }
//! ```

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use saga_core::driver::RECORD_KIND_HEADER;
use saga_core::Envelope;

use crate::admin::TopicSpec;
use crate::config::KafkaConfig;

/// One committed record, as an independent reader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommittedRecord {
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
    /// The key (lossily as text).
    pub key: String,
    /// The runtime's record-kind header, if any.
    pub kind: Option<String>,
    /// The `traceparent` header, if any (lossily as text).
    pub traceparent: Option<String>,
    /// The bytes (empty for a tombstone).
    pub value: Vec<u8>,
    /// Whether it is a tombstone (no value: its key is deleted).
    pub tombstone: bool,
}

/// A test's namespace on the broker at `KAFKA_BOOTSTRAP_SERVERS`.
#[derive(Clone, Debug)]
pub struct KafkaFixture {
    bootstrap: String,
    ns: String,
}

impl Default for KafkaFixture {
    fn default() -> Self {
        Self::new()
    }
}

impl KafkaFixture {
    /// A fresh namespace on the broker at `KAFKA_BOOTSTRAP_SERVERS`.
    ///
    /// # Panics
    /// If `KAFKA_BOOTSTRAP_SERVERS` is not set (a test that needs a broker
    /// says so and stops; it never passes by skipping).
    pub fn new() -> Self {
        let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .expect("KAFKA_BOOTSTRAP_SERVERS must point at a broker (scripts/test.sh starts one)");
        Self::on(bootstrap)
    }

    /// A fresh namespace on the broker at `bootstrap`.
    pub fn on(bootstrap: impl Into<String>) -> Self {
        let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        Self {
            bootstrap: bootstrap.into(),
            ns,
        }
    }

    /// The broker's address.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// The namespace: a random prefix unique to this fixture.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// `name` in the namespace: `<ns>.<name>`.
    pub fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.ns)
    }

    /// A configuration for instance `instance` in the namespace (the app
    /// name is the namespace, so groups and transactional ids are too),
    /// with timings for tests: 30 ms batches, a 6 s session timeout, 15 s
    /// transactions, 3 partitions.
    pub fn config(&self, instance: &str) -> KafkaConfig {
        KafkaConfig::new(&self.bootstrap)
            .app(&self.ns)
            .instance_id(instance)
            .batch(200, Duration::from_millis(30))
            .session_timeout(Duration::from_secs(6))
            .timeouts(Duration::from_secs(15), Duration::from_secs(10))
            .partitions(3)
    }

    /// Creates `topics` (message topics, with the configured partitions).
    ///
    /// # Panics
    /// If the broker refuses (a test fixture: the test fails with why).
    pub async fn create_topics(&self, topics: &[&str]) {
        let specs: Vec<TopicSpec> = topics.iter().map(|t| TopicSpec::messages(*t)).collect();
        crate::admin::ensure_topics(&self.config("admin"), &specs)
            .await
            .unwrap_or_else(|e| panic!("cannot create {topics:?}: {e}"));
    }

    /// Every committed record on `topic`, read from the beginning to the
    /// last stable offset by an independent `read_committed` consumer.
    ///
    /// # Panics
    /// If the topic does not exist or cannot be read within 30 s.
    pub fn read_committed_records(&self, topic: &str) -> Vec<CommittedRecord> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set(
                "group.id",
                format!("{}-reader-{}", self.ns, uuid::Uuid::new_v4()),
            )
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create()
            .expect("a reader");
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("the topic's metadata");
        let parts: Vec<i32> = md
            .topics()
            .first()
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        assert!(!parts.is_empty(), "{topic} does not exist");
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .expect("an assignment");
        }
        c.assign(&tpl).expect("an assignment");
        let mut left: BTreeSet<i32> = parts.into_iter().collect();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !left.is_empty() {
            assert!(Instant::now() < deadline, "reading {topic} took too long");
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let header = |name: &str| {
                        m.headers().and_then(|h| {
                            h.iter()
                                .find(|h| h.key == name)
                                .and_then(|h| h.value)
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                        })
                    };
                    let kind = header(RECORD_KIND_HEADER);
                    let traceparent = header(saga_core::TRACEPARENT_HEADER);
                    out.push(CommittedRecord {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: String::from_utf8_lossy(m.key().unwrap_or(&[])).into_owned(),
                        kind,
                        traceparent,
                        value: m.payload().unwrap_or(&[]).to_vec(),
                        tombstone: m.payload().is_none(),
                    });
                }
                Some(Err(RdError::PartitionEOF(p))) => {
                    left.remove(&p);
                }
                Some(Err(e)) => panic!("error reading {topic}: {e}"),
                None => {}
            }
        }
        out
    }

    /// Writes one record as it is, outside any transaction: for tests that
    /// put on a topic what no runtime would write (garbage, a tombstone, a
    /// forged record-kind header). `partition` `None` partitions by key as
    /// the runtime does.
    ///
    /// # Panics
    /// If the broker does not take it within 10 s.
    pub fn produce_raw(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        kind: Option<&str>,
    ) {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
        let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("partitioner", "murmur2_random")
            .set("message.max.bytes", "2000000")
            .create()
            .expect("a producer");
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        if let Some(partition) = partition {
            rec = rec.partition(partition);
        }
        if let Some(kind) = kind {
            rec = rec.headers(OwnedHeaders::new().insert(Header {
                key: RECORD_KIND_HEADER,
                value: Some(kind),
            }));
        }
        p.send(rec)
            .map_err(|(e, _)| e)
            .expect("the record is queued");
        p.flush(Duration::from_secs(10))
            .expect("the record is written");
    }

    /// Every committed envelope on `topic`: a message topic's (the start
    /// and operator requests on a reply topic, which carry a record-kind
    /// header, left out). Not for state or ledger topics, whose records
    /// are not envelopes: see [`KafkaFixture::read_committed_records`].
    ///
    /// # Panics
    /// As [`KafkaFixture::read_committed_records`], or if a message record
    /// is not an envelope.
    pub fn read_committed(&self, topic: &str) -> Vec<Envelope> {
        self.read_committed_records(topic)
            .into_iter()
            .filter(|r| r.kind.is_none())
            .map(|r| {
                Envelope::from_bytes(&r.value)
                    .unwrap_or_else(|e| panic!("not an envelope on {topic}: {e}"))
            })
            .collect()
    }
}
