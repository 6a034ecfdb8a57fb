//! What travels over channels: commands, replies, events and dead letters.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{concat, concat_shared, MessageId, Part::N, Part::S, SagaId, Timestamp};
use crate::retry::ErrorClass;
use crate::trace::TraceContext;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// An instruction to a participant (a step's action or its compensation).
    Command,
    /// A participant's answer to a command.
    Reply,
    /// A fact published for anyone (projections, other services).
    Event,
}

impl MessageKind {
    /// The kind's name, as used in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Command => "command",
            MessageKind::Reply => "reply",
            MessageKind::Event => "event",
        }
    }
}

/// Whether a command runs a step forward or compensates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The step's action.
    Forward,
    /// The step's compensation.
    Compensation,
}

impl Phase {
    /// `"forward"` or `"compensation"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Compensation => "compensation",
        }
    }
}

/// How a participant's reply turned out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReplyOutcome {
    /// The command took effect; the payload is the participant's reply.
    Success,
    /// The command failed. A permanent failure took no effect; after a
    /// retryable one the effect is unknown (another delivery of the same
    /// command may have taken effect).
    Failure {
        /// Whether the orchestrator may try the command again.
        class: ErrorClass,
        /// The participant's error, for humans.
        error: String,
        /// How many times the participant ran the command before it gave
        /// up (its local retries; 1 without them).
        #[serde(default = "one")]
        attempts: u32,
    },
}

fn one() -> u32 {
    1
}

impl ReplyOutcome {
    /// A failure of `class` after one attempt.
    pub fn failure(class: ErrorClass, error: impl Into<String>) -> Self {
        ReplyOutcome::Failure {
            class,
            error: error.into(),
            attempts: 1,
        }
    }
}

/// One message on a channel, with the metadata the engine and runtimes need.
///
/// The payload is the user's typed value, serialized as JSON. Build one
/// with [`Envelope::command`] or [`Envelope::event`]; the engine builds
/// steps' commands and replies itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Envelope {
    /// Unique per logical message; a message produced again keeps its id.
    pub id: MessageId,
    /// The channel (topic) the message is sent to.
    pub channel: String,
    /// The saga this message belongs to; also the partition key.
    pub saga_id: SagaId,
    /// The saga type's name.
    pub saga: String,
    /// Command, reply or event.
    pub kind: MessageKind,
    /// The step this message belongs to, for commands and replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Forward or compensation, for commands and replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The number (1-based) of the command this is or answers among all
    /// the commands sent for its step and phase: every attempt, operator
    /// retries included, gets the next number, so every attempt is a new
    /// message to the participant.
    #[serde(default)]
    pub attempt: u32,
    /// Where a participant sends its reply; `None` for fire-and-forget commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// For replies: success or failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ReplyOutcome>,
    /// When the message was created.
    pub timestamp: Timestamp,
    /// The user's payload.
    pub payload: Value,
    /// The trace the message belongs to (W3C `traceparent`), its span id
    /// the span that sent it; left out when none. Runtimes also write it
    /// as the [`TRACEPARENT_HEADER`](crate::TRACEPARENT_HEADER) record
    /// header, which wins over this field when a record has both. A
    /// malformed value reads as none.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::trace::lenient"
    )]
    pub traceparent: Option<TraceContext>,
}

impl Envelope {
    /// The message id of command number `attempt` of `step` of saga
    /// `saga_id` (of saga type `saga`) in `phase`:
    /// `{saga}:{saga_id}/{step}/{phase}/{attempt}`.
    ///
    /// Stable across redeliveries of one attempt (a command produced again
    /// after a crash keeps its id, so participants deduplicate it), new for
    /// every attempt (so a retried step really runs again). The saga type
    /// keeps two saga types that share ids and step names apart.
    pub fn command_id(
        saga: &str,
        saga_id: &SagaId,
        step: &str,
        phase: Phase,
        attempt: u32,
    ) -> MessageId {
        MessageId::from(concat_shared(&[
            S(saga),
            S(":"),
            S(saga_id.as_str()),
            S("/"),
            S(step),
            S("/"),
            S(phase.as_str()),
            S("/"),
            N(attempt.into()),
        ]))
    }

    /// The business key of `step` of saga `saga_id` (of type `saga`) in
    /// `phase`: `{saga}:{saga_id}/{step}/{phase}`, the same for every
    /// attempt (see [`Envelope::idempotency_key`]).
    pub fn step_key(saga: &str, saga_id: &SagaId, step: &str, phase: Phase) -> String {
        concat(&[
            S(saga),
            S(":"),
            S(saga_id.as_str()),
            S("/"),
            S(step),
            S("/"),
            S(phase.as_str()),
        ])
    }

    /// The business key of a command: [`Envelope::step_key`] for a step's
    /// command, the same for every attempt of it; the message id for a
    /// fire-and-forget command.
    ///
    /// A participant whose handler has outside effects uses it for its own
    /// idempotency: a second attempt of a step that already took effect
    /// (its reply was late or lost) must answer the same way without
    /// acting twice.
    pub fn idempotency_key(&self) -> String {
        match (&self.step, self.phase) {
            (Some(step), Some(phase)) => Self::step_key(&self.saga, &self.saga_id, step, phase),
            _ => self.id.to_string(),
        }
    }

    /// The partition key: the saga id.
    pub fn key(&self) -> &str {
        self.saga_id.as_str()
    }

    /// Serializes the envelope to JSON bytes.
    ///
    /// # Panics
    /// Never: an envelope holds only strings, numbers, plain enums and a
    /// JSON [`Value`], which serde_json always encodes (it fails only on
    /// maps with non-string keys and on custom `Serialize` errors, neither
    /// of which an envelope can hold).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Room for a typical envelope up front: growing the buffer step by
        // step costs more than the encoding itself.
        let mut out = Vec::with_capacity(512);
        serde_json::to_writer(&mut out, self).expect("an envelope is plain JSON data");
        out
    }

    /// Parses an envelope from JSON bytes.
    ///
    /// # Errors
    /// If the bytes are not the JSON of an envelope.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        from_json(bytes)
    }

    /// Builds the reply to this command, sent to its `reply_to` channel,
    /// in the command's trace (set [`Envelope::traceparent`] to the
    /// replier's span).
    ///
    /// Returns `None` for a fire-and-forget command (no `reply_to`).
    pub fn reply(&self, outcome: ReplyOutcome, payload: Value, now: Timestamp) -> Option<Envelope> {
        let reply_to = self.reply_to.clone()?;
        Some(Envelope {
            id: MessageId::from(concat_shared(&[S(self.id.as_str()), S("/reply")])),
            channel: reply_to,
            saga_id: self.saga_id.clone(),
            saga: self.saga.clone(),
            kind: MessageKind::Reply,
            step: self.step.clone(),
            phase: self.phase,
            attempt: self.attempt,
            reply_to: None,
            outcome: Some(outcome),
            timestamp: now,
            payload,
            traceparent: self.traceparent,
        })
    }

    /// A fire-and-forget command for `saga_id` on `channel` (no reply
    /// expected: set [`Envelope::reply_to`] for one).
    pub fn command(
        id: MessageId,
        channel: impl Into<String>,
        saga_id: SagaId,
        saga: impl Into<String>,
        payload: Value,
        now: Timestamp,
    ) -> Envelope {
        Envelope {
            kind: MessageKind::Command,
            attempt: 1,
            ..Envelope::event(id, channel, saga_id, saga, payload, now)
        }
    }

    /// An event for `saga_id` on `channel`.
    pub fn event(
        id: MessageId,
        channel: impl Into<String>,
        saga_id: SagaId,
        saga: impl Into<String>,
        payload: Value,
        now: Timestamp,
    ) -> Envelope {
        Envelope {
            id,
            channel: channel.into(),
            saga_id,
            saga: saga.into(),
            kind: MessageKind::Event,
            step: None,
            phase: None,
            attempt: 0,
            reply_to: None,
            outcome: None,
            timestamp: now,
            payload,
            traceparent: None,
        }
    }

    /// The same envelope in trace `trace` (its span the sender's).
    pub fn with_traceparent(mut self, trace: Option<TraceContext>) -> Self {
        self.traceparent = trace;
        self
    }
}

/// An envelope kept in its encoded form, its JSON text, shared: what a
/// saga instance keeps of the command it waits on
/// ([`Awaiting::command`](crate::instance::Awaiting::command)).
///
/// An envelope kept as an [`Envelope`] costs about a kilobyte of memory
/// (its strings and, above all, its payload's JSON map), and every state
/// record written encodes it again. Kept as text it costs its JSON's size,
/// copying it copies a pointer, writing it writes the text as it is, and
/// reading a state record only checks it. [`EncodedEnvelope::decode`]
/// gives the envelope back, for the rare dead letter that carries it.
///
/// In JSON it is written as the envelope itself (a nested object, not a
/// string), so state records read and written by earlier versions are
/// unchanged; the text read is written again as it is (spacing
/// included). It also keeps the envelope's
/// [`timestamp`](EncodedEnvelope::timestamp), read once when it is made
/// or read back. Two are equal when their texts read as the same JSON.
///
/// It is written and read with serde_json only (text, bytes or a
/// [`Value`]), and not inside `#[serde(flatten)]` or untagged and
/// internally tagged enums, which buffer what they read: the state of a
/// saga is JSON.
#[derive(Clone)]
pub struct EncodedEnvelope {
    json: std::sync::Arc<serde_json::value::RawValue>,
    timestamp: Timestamp,
}

impl EncodedEnvelope {
    /// Encodes `envelope`.
    ///
    /// # Panics
    /// Never: an envelope is plain JSON data (see [`Envelope::to_bytes`]).
    pub fn encode(envelope: &Envelope) -> Self {
        let json =
            serde_json::value::to_raw_value(envelope).expect("an envelope is plain JSON data");
        Self {
            json: json.into(),
            timestamp: envelope.timestamp,
        }
    }

    /// The envelope, decoded from its text.
    ///
    /// # Errors
    /// If the text is not an envelope's JSON. An envelope encoded by
    /// [`EncodedEnvelope::encode`] always decodes; one read back from a
    /// record written elsewhere is only checked to be JSON when it is read.
    pub fn decode(&self) -> Result<Envelope, serde_json::Error> {
        serde_json::from_str(self.json.get())
    }

    /// The envelope's JSON text.
    pub fn json(&self) -> &str {
        self.json.get()
    }

    /// When the envelope was created ([`Envelope::timestamp`]).
    pub fn timestamp(&self) -> Timestamp {
        self.timestamp
    }
}

impl From<&Envelope> for EncodedEnvelope {
    fn from(envelope: &Envelope) -> Self {
        Self::encode(envelope)
    }
}

impl std::fmt::Debug for EncodedEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("EncodedEnvelope")
            .field(&self.json())
            .finish()
    }
}

impl PartialEq for EncodedEnvelope {
    /// The same JSON value: the same text, or text that reads as the same
    /// value (another key order or spacing, as a store may write it).
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
            || match (
                serde_json::from_str::<Value>(self.json()),
                serde_json::from_str::<Value>(other.json()),
            ) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            }
    }
}

impl Eq for EncodedEnvelope {}

impl Serialize for EncodedEnvelope {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for EncodedEnvelope {
    fn deserialize<De: serde::Deserializer<'de>>(deserializer: De) -> Result<Self, De::Error> {
        /// The one field read at once.
        #[derive(Deserialize)]
        struct Head {
            timestamp: Timestamp,
        }
        let json = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
        let head: Head = serde_json::from_str(json.get()).map_err(serde::de::Error::custom)?;
        Ok(Self {
            json: json.into(),
            timestamp: head.timestamp,
        })
    }
}

/// A message that could not be processed, with why, parked for an operator.
///
/// Written to a dead-letter channel; never dropped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The dead letter's own id (derived from the original message's id).
    pub id: MessageId,
    /// The dead-letter channel it is written to.
    pub channel: String,
    /// Who gave up: the saga type or participant name.
    pub source: String,
    /// The message as it was received or would have been sent.
    pub original: Envelope,
    /// When the last attempt failed.
    pub failure_timestamp: Timestamp,
    /// How many attempts were made.
    pub retry_count: u32,
    /// Why it was dead-lettered (e.g. "max retries reached (3 attempts)").
    pub reason: String,
    /// The error of the last attempt.
    pub last_error: String,
    /// Where the input that failed was read, when it was a record of a
    /// topic (a poison record, a reply that could not be applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<RecordOrigin>,
    /// When the original was too large to keep whole in a dead letter: its
    /// size in bytes (its payload is then a truncated copy, as text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated_from: Option<usize>,
}

/// Where a record was read: its topic, partition and offset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecordOrigin {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The offset.
    pub offset: u64,
}

impl RecordOrigin {
    /// Record `offset` of `partition` of `topic`.
    pub fn new(topic: impl Into<String>, partition: u32, offset: u64) -> Self {
        Self {
            topic: topic.into(),
            partition,
            offset,
        }
    }
}

impl DeadLetter {
    /// A dead letter for `original`, written to `channel` by `source` at
    /// `now` after `retry_count` attempts, with why (`reason`) and the last
    /// attempt's error. Its id is `{original id}/dead-letter`.
    pub fn new(
        channel: impl Into<String>,
        source: impl Into<String>,
        original: Envelope,
        now: Timestamp,
        retry_count: u32,
        reason: impl Into<String>,
        last_error: impl Into<String>,
    ) -> Self {
        Self {
            id: MessageId::from(concat_shared(&[S(original.id.as_str()), S("/dead-letter")])),
            channel: channel.into(),
            source: source.into(),
            original,
            failure_timestamp: now,
            retry_count,
            reason: reason.into(),
            last_error: last_error.into(),
            origin: None,
            truncated_from: None,
        }
    }

    /// The same dead letter, saying where its input was read.
    pub fn with_origin(mut self, origin: RecordOrigin) -> Self {
        self.origin = Some(origin);
        self
    }

    /// The dead letter as an envelope of at most `limit` bytes: when the
    /// original makes it larger, the original's payload is replaced by a
    /// truncated copy of its text and [`DeadLetter::truncated_from`] says
    /// how large it was. The reason, the metadata and the origin are kept.
    pub fn to_envelope_within(&self, limit: usize) -> Envelope {
        let env = self.to_envelope();
        let size = env.to_bytes().len();
        if size <= limit {
            return env;
        }
        let mut small = self.clone();
        let text = match &self.original.payload {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        // Keep what fits under half the limit (the rest of the dead letter
        // is small), cut at a character boundary.
        let keep = limit / 2;
        let mut cut = keep.min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        small.original.payload = Value::String(text[..cut].to_owned());
        small.truncated_from = Some(size);
        small.to_envelope()
    }

    /// The dead letter wrapped as an event envelope on its channel, keyed by
    /// the original message's saga id, in the original's trace.
    ///
    /// # Panics
    /// Never: a dead letter, like an envelope, is plain JSON data (strings,
    /// numbers, plain enums, an envelope).
    pub fn to_envelope(&self) -> Envelope {
        Envelope::event(
            self.id.clone(),
            self.channel.clone(),
            self.original.saga_id.clone(),
            self.original.saga.clone(),
            serde_json::to_value(self).expect("a dead letter is plain JSON data"),
            self.failure_timestamp,
        )
        .with_traceparent(self.original.traceparent)
    }

    /// Reads a dead letter back from an envelope made by [`DeadLetter::to_envelope`].
    ///
    /// # Errors
    /// If the envelope's payload is not a dead letter.
    pub fn from_envelope(envelope: &Envelope) -> Result<Self, serde_json::Error> {
        serde_json::from_value(envelope.payload.clone())
    }
}

/// `T` read from JSON bytes, as `serde_json::from_slice` reads it (the
/// same value, the same errors), for less: the bytes are checked as UTF-8
/// once, in one pass, and then read as text, where reading from bytes
/// checks each string it meets on its own (a fifth of an envelope's
/// decoding). Bytes that are not UTF-8 are left to `from_slice`, for its
/// error.
pub(crate) fn from_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, serde_json::Error> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

/// The length of `value`'s JSON, counted without keeping the bytes.
pub(crate) fn json_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, serde_json::Error> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value)?;
    Ok(count.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_read_through_text_reads_what_bytes_read_and_fails_alike() {
        let cmd = a_command();
        let bytes = cmd.to_bytes();
        assert_eq!(from_json::<Envelope>(&bytes).unwrap(), cmd);
        // Escapes, non-ASCII text and borrowed strings read as from bytes.
        let text = "{\"a\": \"caf\\u00e9 \\\"q\\\" é\", \"b\": [1, -2.5e3, null]}".as_bytes();
        let via_text: Value = from_json(text).unwrap();
        assert_eq!(via_text, serde_json::from_slice::<Value>(text).unwrap());
        assert_eq!(via_text["a"], "caf\u{e9} \"q\" \u{e9}");
        // Bytes that are not UTF-8, or not JSON, fail with from_slice's error.
        for bad in [&b"{\"a\": \"\xff\"}"[..], b"{\"a\": 1", b"", b"[1] x"] {
            let ours = from_json::<Value>(bad).unwrap_err().to_string();
            let theirs = serde_json::from_slice::<Value>(bad)
                .unwrap_err()
                .to_string();
            assert_eq!(ours, theirs, "{bad:?}");
        }
    }

    #[test]
    fn the_counted_json_length_is_the_length_of_the_bytes() {
        let env = Envelope::command(
            MessageId::new("m-1"),
            "inventory.requests",
            SagaId::new("o-\"1\""),
            "order",
            serde_json::json!({"items": ["a", "b\u{e9}"], "n": 3}),
            Timestamp::from_millis(42),
        );
        assert_eq!(json_len(&env).unwrap(), env.to_bytes().len());
        let value = serde_json::json!({"k": [1, 2.5, null, "x\ny"]});
        assert_eq!(
            json_len(&value).unwrap(),
            serde_json::to_vec(&value).unwrap().len()
        );
    }

    fn a_command() -> Envelope {
        let saga_id = SagaId::new("o-1");
        let id = Envelope::command_id("order", &saga_id, "reserve", Phase::Forward, 1);
        let payload = serde_json::json!({"items": [1, 2], "note": "a \"quoted\" word"});
        let mut cmd = Envelope::command(
            id,
            "inv",
            saga_id,
            "order",
            payload,
            Timestamp::from_millis(42),
        );
        cmd.step = Some("reserve".into());
        cmd.phase = Some(Phase::Forward);
        cmd.reply_to = Some("order.replies".into());
        cmd
    }

    #[test]
    fn an_encoded_envelope_is_written_as_the_envelope_itself() {
        let cmd = a_command();
        let kept = EncodedEnvelope::encode(&cmd);
        assert_eq!(kept.timestamp(), Timestamp::from_millis(42));
        // Nested as an object, the same JSON as the envelope's own.
        assert_eq!(
            serde_json::to_string(&kept).unwrap(),
            serde_json::to_string(&cmd).unwrap()
        );
        let wrapped = serde_json::to_value(serde_json::json!({ "command": &kept })).unwrap();
        assert_eq!(wrapped["command"], serde_json::to_value(&cmd).unwrap());
        assert_eq!(kept.decode().unwrap(), cmd);
    }

    #[test]
    fn an_encoded_envelope_reads_back_from_text_and_from_a_value() {
        let cmd = a_command();
        let text = format!(
            r#"{{"command": {} }}"#,
            serde_json::to_string_pretty(&cmd).unwrap()
        );
        #[derive(Deserialize)]
        struct Holder {
            command: EncodedEnvelope,
        }
        let read: Holder = serde_json::from_str(&text).unwrap();
        assert_eq!(read.command.timestamp(), Timestamp::from_millis(42));
        assert_eq!(read.command.decode().unwrap(), cmd);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let from_value: Holder = serde_json::from_value(value).unwrap();
        assert_eq!(from_value.command.decode().unwrap(), cmd);
        assert_eq!(from_value.command.timestamp(), Timestamp::from_millis(42));
    }

    #[test]
    fn encoded_envelopes_are_equal_when_their_texts_read_as_the_same_json() {
        let cmd = a_command();
        let kept = EncodedEnvelope::encode(&cmd);
        // Through a `Value`, the keys come back in another order.
        let value = serde_json::to_value(&kept).unwrap();
        let reordered: EncodedEnvelope = serde_json::from_value(value).unwrap();
        assert_ne!(reordered.json(), kept.json());
        assert_eq!(reordered, kept);
        let pretty: EncodedEnvelope =
            serde_json::from_str(&serde_json::to_string_pretty(&cmd).unwrap()).unwrap();
        assert_eq!(pretty, kept);
        let mut other = cmd;
        other.attempt = 2;
        assert_ne!(EncodedEnvelope::encode(&other), kept);
    }

    #[test]
    fn an_encoded_envelope_that_is_not_an_envelope_fails_to_decode_not_to_read() {
        // Read: it is JSON with a timestamp; only decoding finds the rest missing.
        let odd: EncodedEnvelope = serde_json::from_str(r#"{"timestamp": 7, "x": [1]}"#).unwrap();
        assert_eq!(odd.timestamp(), Timestamp::from_millis(7));
        assert!(odd.decode().is_err());
        // Without a timestamp, or not JSON at all: refused when read.
        assert!(serde_json::from_str::<EncodedEnvelope>(r#"{"x": 1}"#).is_err());
        assert!(serde_json::from_str::<EncodedEnvelope>(r#"{"timestamp": 1"#).is_err());
    }

    #[test]
    fn ids_and_keys_keep_their_formats() {
        let saga_id = SagaId::new("o-1");
        let step = Envelope::step_key("order", &saga_id, "reserve", Phase::Compensation);
        assert_eq!(step, "order:o-1/reserve/compensation");
        let id = Envelope::command_id("order", &saga_id, "reserve", Phase::Forward, 12);
        assert_eq!(id.as_str(), "order:o-1/reserve/forward/12");
        let mut cmd = Envelope::command(id, "inv", saga_id, "order", Value::Null, Timestamp::EPOCH);
        cmd.reply_to = Some("order.replies".into());
        let reply = cmd.reply(ReplyOutcome::Success, Value::Null, Timestamp::EPOCH);
        let reply = reply.unwrap();
        assert_eq!(reply.id.as_str(), "order:o-1/reserve/forward/12/reply");
        let dead = DeadLetter::new("dlq", "order", reply, Timestamp::EPOCH, 1, "why", "err");
        assert_eq!(
            dead.id.as_str(),
            "order:o-1/reserve/forward/12/reply/dead-letter"
        );
    }
}
