//! Records: what drivers read from and write to a runtime's log.

use std::fmt;

use crate::ids::{MessageId, SagaId, Timestamp};
use crate::message::Envelope;
use crate::trace::TraceContext;

/// The header that says which kind of runtime record a record is, where one
/// topic holds several kinds (a reply topic carries replies, start
/// requests and operator requests). Plain messages have no header, and
/// the Kafka runtime writes none on saga states and ledger entries either:
/// they are restored by key from compacted topics of their own (a ledger
/// topic's per-partition state is told from its entries by its key too;
/// it keeps the header for other tools).
pub const RECORD_KIND_HEADER: &str = "saga-record";

/// What a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordKind {
    /// An [`Envelope`] as JSON: a command, reply, event or dead letter (no header).
    Message,
    /// A saga instance (in the saga's state topic, and nowhere else).
    SagaState,
    /// An operator's request for a saga (on its reply topic).
    Operator,
    /// A request to start a saga, for the worker that owns its partition
    /// (on its reply topic).
    Start,
    /// A participant's ledger entry (in its ledger topic).
    Ledger,
    /// A participant's per-partition state snapshot (in its ledger topic).
    ParticipantState,
}

impl RecordKind {
    /// The value of the [`RECORD_KIND_HEADER`] header for this kind (`None`
    /// for plain messages; the Kafka runtime also leaves it off saga
    /// states and ledger entries).
    pub fn header(self) -> Option<&'static str> {
        match self {
            RecordKind::Message => None,
            RecordKind::SagaState => Some("state"),
            RecordKind::Operator => Some("operator"),
            RecordKind::Start => Some("start"),
            RecordKind::Ledger => Some("ledger"),
            RecordKind::ParticipantState => Some("shard"),
        }
    }

    /// The kind a header value names; `Ok(Message)` without a header.
    ///
    /// # Errors
    /// The header's value (lossily as text) if it names no kind.
    pub fn from_header(value: Option<&[u8]>) -> Result<Self, String> {
        let Some(v) = value else {
            return Ok(RecordKind::Message);
        };
        match v {
            b"state" => Ok(RecordKind::SagaState),
            b"operator" => Ok(RecordKind::Operator),
            b"start" => Ok(RecordKind::Start),
            b"ledger" => Ok(RecordKind::Ledger),
            b"shard" => Ok(RecordKind::ParticipantState),
            other => Err(String::from_utf8_lossy(other).into_owned()),
        }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.header().unwrap_or("message"))
    }
}

/// A record for the runtime to write, in the open batch (transaction).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The topic (channel) it goes to.
    pub topic: String,
    /// Its key: the saga id for messages and saga state (so every record of
    /// one saga shares a partition number), a ledger key for ledger entries.
    pub key: String,
    /// The bytes; `None` is a tombstone (deletes the key in a compacted topic).
    pub value: Option<Vec<u8>>,
    /// What it is (written as the [`RECORD_KIND_HEADER`] header where
    /// its topic holds other kinds too; see [`RECORD_KIND_HEADER`]).
    pub kind: RecordKind,
    /// An explicit partition; `None`: the key's partition
    /// ([`partition_for`]).
    pub partition: Option<u32>,
    /// The trace context to write as the
    /// [`TRACEPARENT_HEADER`](crate::TRACEPARENT_HEADER) header: a
    /// message's [`Envelope::traceparent`], a start request's trace.
    pub traceparent: Option<TraceContext>,
}

impl Record {
    /// A message: the envelope as JSON on its channel, keyed by its saga id.
    pub fn message(env: &Envelope) -> Self {
        Self {
            topic: env.channel.clone(),
            key: env.key().to_owned(),
            value: Some(env.to_bytes()),
            kind: RecordKind::Message,
            partition: None,
            traceparent: env.traceparent,
        }
    }

    /// A message whose JSON, `json`, was encoded already (the text
    /// [`Envelope::to_bytes`] writes for `env`).
    pub(crate) fn message_text(env: &Envelope, json: &str) -> Self {
        Self {
            topic: env.channel.clone(),
            key: env.key().to_owned(),
            value: Some(json.as_bytes().to_vec()),
            kind: RecordKind::Message,
            partition: None,
            traceparent: env.traceparent,
        }
    }

    /// A record of `kind` on `topic` under `key`.
    pub fn new(
        topic: impl Into<String>,
        key: impl Into<String>,
        value: Option<Vec<u8>>,
        kind: RecordKind,
    ) -> Self {
        Self {
            topic: topic.into(),
            key: key.into(),
            value,
            kind,
            partition: None,
            traceparent: None,
        }
    }

    /// The same record, with the trace context header `trace`.
    pub fn with_traceparent(mut self, trace: Option<TraceContext>) -> Self {
        self.traceparent = trace;
        self
    }

    /// The same record, produced to `partition` explicitly.
    pub fn on_partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// The size of the key and value, in bytes.
    pub fn size(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// A record read from the runtime's log, as a driver sees it.
#[derive(Clone, Copy, Debug)]
pub struct Incoming<'a> {
    /// The topic (channel).
    pub topic: &'a str,
    /// The partition.
    pub partition: u32,
    /// Its offset in the partition.
    pub offset: u64,
    /// Its key, if any.
    pub key: Option<&'a [u8]>,
    /// Its bytes (`None`: a tombstone).
    pub value: Option<&'a [u8]>,
    /// The value of its [`RECORD_KIND_HEADER`] header, if any.
    pub kind: Option<&'a [u8]>,
    /// The value of its [`TRACEPARENT_HEADER`](crate::TRACEPARENT_HEADER)
    /// header, if any (runtimes without headers leave it `None`).
    pub traceparent: Option<&'a [u8]>,
}

impl Incoming<'_> {
    /// The record's value read as an envelope, its trace context taken
    /// from the [`TRACEPARENT_HEADER`](crate::TRACEPARENT_HEADER) header
    /// when the record has a well-formed one (other tools propagate
    /// traces in headers), else from the envelope's own field. A malformed
    /// header is ignored with a warning.
    ///
    /// # Errors
    /// If the value is missing or not the JSON of an envelope.
    pub fn envelope(&self) -> Result<Envelope, serde_json::Error> {
        let mut env = Envelope::from_bytes(self.value.unwrap_or_default())?;
        if let Some(trace) = crate::trace::from_header(self.traceparent) {
            env.traceparent = Some(trace);
        }
        Ok(env)
    }

    /// Where the record was read.
    pub fn origin(&self) -> crate::message::RecordOrigin {
        crate::message::RecordOrigin::new(self.topic, self.partition, self.offset)
    }

    /// A stand-in envelope for a record that could not be read as what it
    /// should be, to carry it in a dead letter: an event whose id is
    /// `topic/partition/offset`, keyed by the record's key, its payload the
    /// record's bytes as (lossy) text.
    pub fn as_poison(&self, saga: &str, now: Timestamp) -> Envelope {
        let key = self
            .key
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let text = self
            .value
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        Envelope::event(
            MessageId::new(format!("{}/{}/{}", self.topic, self.partition, self.offset)),
            self.topic,
            SagaId::new(key),
            saga,
            serde_json::Value::String(text),
            now,
        )
    }
}

/// Kafka's murmur2 hash (`org.apache.kafka.common.utils.Utils.murmur2`), as
/// its Java client and librdkafka's `murmur2_random` partitioner compute it.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let len = data.len();
    let mut h: u32 = 0x9747_b28c ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of `key` among `partitions` (at least 1), as Kafka's
/// default partitioner places keyed records: every runtime puts a saga's
/// records in the same partition number of every topic.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Kafka's UtilsTest vectors (as signed Java ints).
        for (key, want) in [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
        ] {
            assert_eq!(murmur2(key.as_bytes()) as i32, want, "{key}");
        }
    }

    #[test]
    fn record_kinds_round_trip_through_their_header() {
        for kind in [
            RecordKind::Message,
            RecordKind::SagaState,
            RecordKind::Operator,
            RecordKind::Start,
            RecordKind::Ledger,
            RecordKind::ParticipantState,
        ] {
            let header = kind.header().map(str::as_bytes);
            assert_eq!(RecordKind::from_header(header), Ok(kind));
        }
        assert_eq!(
            RecordKind::from_header(Some(b"bogus")),
            Err("bogus".to_owned())
        );
    }
}
