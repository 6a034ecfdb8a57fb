//! Trace context: the W3C `traceparent` that ties one saga's spans
//! together across services.
//!
//! A saga keeps the [`TraceContext`] it was started in
//! ([`SagaInstance::trace`](crate::SagaInstance::trace)); every message the
//! engine and the participants send for it carries one
//! ([`Envelope::traceparent`](crate::Envelope::traceparent)), whose span id
//! is the span that sent it. Runtimes also write it as the
//! [`TRACEPARENT_HEADER`] record header. The drivers' spans (`saga.start`,
//! `saga.reply`, `saga.timer`, `saga.operate`, `participant.attempt`)
//! record it as the fields `trace_id`, `span_id` and `parent_span_id`, so a
//! log search for one trace id finds every service's lines for one saga.
//!
//! With the feature `otel`, [`link_span`] also makes the context the
//! span's OpenTelemetry parent (through `tracing-opentelemetry`), so the
//! exported spans of one saga form one trace, and the span ids the
//! messages carry are the exported spans' ids.
//!
//! ```
//! use saga_core::TraceContext;
//!
//! let parent: TraceContext = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
//! assert_eq!(parent.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! let child = parent.child();
//! assert_eq!(child.trace_id(), parent.trace_id());
//! assert_ne!(child.span_id(), parent.span_id());
//! assert!("00-00000000000000000000000000000000-00f067aa0ba902b7-01"
//!     .parse::<TraceContext>()
//!     .is_err());
//! # Ok::<(), saga_core::TraceParseError>(())
//! ```

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The name of the record header (and HTTP header) that carries a
/// [`TraceContext`]: `traceparent`, as W3C Trace Context names it.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The length of a version-00 `traceparent` value, in bytes.
pub const TRACEPARENT_LEN: usize = 55;

/// A 16-byte trace id: the same for every span of one trace. Never all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

/// An 8-byte span id: one span of a trace. Never all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 8]);

impl TraceId {
    /// The id of these bytes; `None` for all zeros (invalid in W3C Trace Context).
    pub fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        (bytes != [0; 16]).then_some(Self(bytes))
    }

    /// A new random id.
    pub fn random() -> Self {
        let (a, b) = (random_u64(), random_u64());
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&a.to_be_bytes());
        bytes[8..].copy_from_slice(&b.to_be_bytes());
        Self(bytes)
    }

    /// The id's bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

impl SpanId {
    /// The id of these bytes; `None` for all zeros (invalid in W3C Trace Context).
    pub fn from_bytes(bytes: [u8; 8]) -> Option<Self> {
        (bytes != [0; 8]).then_some(Self(bytes))
    }

    /// A new random id.
    pub fn random() -> Self {
        Self(random_u64().to_be_bytes())
    }

    /// The id's bytes.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0
    }
}

/// Lowercase hex, as in a `traceparent`.
impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0; 32];
        hex_into(&self.0, &mut buf);
        f.write_str(ascii(&buf))
    }
}

/// Lowercase hex, as in a `traceparent`.
impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0; 16];
        hex_into(&self.0, &mut buf);
        f.write_str(ascii(&buf))
    }
}

/// A W3C Trace Context `traceparent`: the trace id, the id of the span
/// that sent a message (the parent of the spans that handle it), and the
/// trace flags (bit 0: sampled).
///
/// Written as `00-{32 hex digits}-{16 hex digits}-{2 hex digits}`, in
/// JSON as that string. Parsing never panics: malformed input is a
/// [`TraceParseError`]. Cheap to copy (25 bytes, no allocation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: TraceId,
    span_id: SpanId,
    flags: u8,
}

/// Why a `traceparent` value was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceParseError {
    /// Not 55 bytes (a later version may be longer, then with a `-` after
    /// the flags).
    #[error("a traceparent is 55 characters `00-<trace id>-<span id>-<flags>`, found {found}")]
    Length {
        /// The length found.
        found: usize,
    },
    /// A character that is not a lowercase hex digit where one belongs, or
    /// a missing `-`.
    #[error("malformed traceparent: unexpected character at position {at}")]
    Malformed {
        /// The 0-based byte position.
        at: usize,
    },
    /// Version `ff`, which W3C Trace Context forbids.
    #[error("traceparent version ff is invalid")]
    Version,
    /// The trace id is all zeros.
    #[error("traceparent trace id is all zeros")]
    ZeroTraceId,
    /// The span (parent) id is all zeros.
    #[error("traceparent parent id is all zeros")]
    ZeroSpanId,
}

impl TraceContext {
    /// The flag bit that says the trace is sampled.
    pub const SAMPLED: u8 = 0x01;

    /// A context of these parts.
    pub fn new(trace_id: TraceId, span_id: SpanId, flags: u8) -> Self {
        Self {
            trace_id,
            span_id,
            flags,
        }
    }

    /// A new trace: random trace and span ids, sampled.
    pub fn root() -> Self {
        Self::new(TraceId::random(), SpanId::random(), Self::SAMPLED)
    }

    /// The same trace with a new random span id (a child span's context).
    pub fn child(&self) -> Self {
        self.with_span_id(SpanId::random())
    }

    /// The same trace and flags with span id `span_id`.
    pub fn with_span_id(&self, span_id: SpanId) -> Self {
        Self { span_id, ..*self }
    }

    /// The trace id.
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The span id (in a message: the span that sent it).
    pub fn span_id(&self) -> SpanId {
        self.span_id
    }

    /// The trace flags.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the sampled flag is set.
    pub fn is_sampled(&self) -> bool {
        self.flags & Self::SAMPLED != 0
    }

    /// Parses a `traceparent` value.
    ///
    /// Version `00` must be exactly 55 characters; a later version (not
    /// `ff`) may be longer, with a `-` after the flags, and is read as far
    /// as version 00 goes. Hex digits must be lowercase.
    ///
    /// # Errors
    /// A [`TraceParseError`] saying what is wrong: the length, a character
    /// at a position, version `ff`, an all-zero trace or span id.
    pub fn parse(value: &str) -> Result<Self, TraceParseError> {
        Self::from_bytes(value.as_bytes())
    }

    /// Parses a `traceparent` value from bytes (a record header).
    ///
    /// # Errors
    /// As [`TraceContext::parse`].
    pub fn from_bytes(b: &[u8]) -> Result<Self, TraceParseError> {
        if b.len() < TRACEPARENT_LEN {
            return Err(TraceParseError::Length { found: b.len() });
        }
        let version = hex_byte(b, 0)?;
        if version == 0xff {
            return Err(TraceParseError::Version);
        }
        if b.len() > TRACEPARENT_LEN && (version == 0 || b[TRACEPARENT_LEN] != b'-') {
            return Err(TraceParseError::Length { found: b.len() });
        }
        for at in [2, 35, 52] {
            if b[at] != b'-' {
                return Err(TraceParseError::Malformed { at });
            }
        }
        let mut trace = [0; 16];
        for (i, byte) in trace.iter_mut().enumerate() {
            *byte = hex_byte(b, 3 + 2 * i)?;
        }
        let mut span = [0; 8];
        for (i, byte) in span.iter_mut().enumerate() {
            *byte = hex_byte(b, 36 + 2 * i)?;
        }
        let flags = hex_byte(b, 53)?;
        let trace_id = TraceId::from_bytes(trace).ok_or(TraceParseError::ZeroTraceId)?;
        let span_id = SpanId::from_bytes(span).ok_or(TraceParseError::ZeroSpanId)?;
        Ok(Self::new(trace_id, span_id, flags))
    }

    /// The `traceparent` value (version 00), without allocating: what a
    /// runtime writes as the [`TRACEPARENT_HEADER`] header.
    pub fn to_header(&self) -> [u8; TRACEPARENT_LEN] {
        let mut out = [b'-'; TRACEPARENT_LEN];
        out[0] = b'0';
        out[1] = b'0';
        hex_into(&self.trace_id.0, &mut out[3..35]);
        hex_into(&self.span_id.0, &mut out[36..52]);
        hex_into(&[self.flags], &mut out[53..55]);
        out
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(ascii(&self.to_header()))
    }
}

impl FromStr for TraceContext {
    type Err = TraceParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for TraceContext {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(ascii(&self.to_header()))
    }
}

impl<'de> Deserialize<'de> for TraceContext {
    fn deserialize<De: Deserializer<'de>>(d: De) -> Result<Self, De::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// For `#[serde(deserialize_with)]`: a malformed or missing context reads
/// as none (with a warning), so one bad field never makes a message or a
/// state record unreadable.
pub(crate) fn lenient<'de, De: Deserializer<'de>>(
    d: De,
) -> Result<Option<TraceContext>, De::Error> {
    d.deserialize_any(Lenient)
}

/// Reads a trace context field as text where the input lends it (no copy,
/// nothing built for a well-formed field), and anything else as none.
struct Lenient;

impl Lenient {
    fn ignored<T: fmt::Display, E>(what: T) -> Result<Option<TraceContext>, E> {
        tracing::warn!(traceparent = %what, "malformed traceparent ignored");
        Ok(None)
    }
}

impl<'de> serde::de::Visitor<'de> for Lenient {
    type Value = Option<TraceContext>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a traceparent string")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
        match TraceContext::parse(s) {
            Ok(ctx) => Ok(Some(ctx)),
            Err(e) => {
                tracing::warn!(traceparent = %s, error = %e, "malformed traceparent ignored");
                Ok(None)
            }
        }
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Self::ignored(v)
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Self::ignored(v)
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Self::ignored(v)
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Self::ignored(v)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Self::ignored("a list")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Self::ignored("a map")
    }
}

/// The context a record header gives, if it gives one; a malformed header
/// is ignored with a warning (the caller falls back to the message's
/// own field).
pub fn from_header(value: Option<&[u8]>) -> Option<TraceContext> {
    let bytes = value?;
    match TraceContext::from_bytes(bytes) {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            tracing::warn!(traceparent = %String::from_utf8_lossy(bytes), error = %e, "malformed traceparent header ignored");
            None
        }
    }
}

/// Ties `span` to the trace of `parent` and returns the context of `span`
/// itself: the context to put on the messages sent under it.
///
/// Records the span's fields `trace_id`, `span_id` and (with a parent)
/// `parent_span_id`; declare them on the span (as
/// `tracing::field::Empty`) for them to show. Without a parent the span
/// starts a new trace. With the feature `otel`, `parent` also becomes the
/// span's OpenTelemetry parent (unless the span is already in that trace
/// through the span it is nested in) and the returned ids are those of
/// the exported span; otherwise the span id is new and random.
pub fn link_span(span: &tracing::Span, parent: Option<&TraceContext>) -> TraceContext {
    let ctx = otel_link(span, parent).unwrap_or_else(|| match parent {
        Some(p) => p.child(),
        None => TraceContext::root(),
    });
    if !span.is_disabled() {
        span.record("trace_id", tracing::field::display(ctx.trace_id()));
        span.record("span_id", tracing::field::display(ctx.span_id()));
        if let Some(p) = parent {
            span.record("parent_span_id", tracing::field::display(p.span_id()));
        }
    }
    ctx
}

#[cfg(not(feature = "otel"))]
fn otel_link(_span: &tracing::Span, _parent: Option<&TraceContext>) -> Option<TraceContext> {
    None
}

#[cfg(feature = "otel")]
fn otel_link(span: &tracing::Span, parent: Option<&TraceContext>) -> Option<TraceContext> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if span.is_disabled() {
        return None;
    }
    if let Some(p) = parent {
        // Nested in a span of the same trace already (the Kafka
        // participant's span around an attempt): keep that parent.
        let current = tracing::Span::current().context();
        let inherited = current.span().span_context().trace_id().to_bytes();
        if inherited != p.trace_id.0 {
            let _ = span.set_parent(p.to_otel_context());
        }
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return None;
    }
    Some(TraceContext::new(
        TraceId::from_bytes(sc.trace_id().to_bytes())?,
        SpanId::from_bytes(sc.span_id().to_bytes())?,
        sc.trace_flags().to_u8(),
    ))
}

#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
impl TraceContext {
    /// The context as a remote OpenTelemetry parent (feature `otel`).
    pub fn to_otel_context(&self) -> opentelemetry::Context {
        use opentelemetry::trace::{
            SpanContext, SpanId as OSpanId, TraceContextExt, TraceFlags, TraceId as OTraceId,
            TraceState,
        };
        let sc = SpanContext::new(
            OTraceId::from_bytes(self.trace_id.0),
            OSpanId::from_bytes(self.span_id.0),
            TraceFlags::new(self.flags),
            true,
            TraceState::default(),
        );
        opentelemetry::Context::new().with_remote_span_context(sc)
    }

    /// The context of `span`'s OpenTelemetry span, if it has a valid one
    /// (feature `otel`; an OpenTelemetry layer must be installed).
    pub fn of_span(span: &tracing::Span) -> Option<Self> {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return None;
        }
        Some(Self::new(
            TraceId::from_bytes(sc.trace_id().to_bytes())?,
            SpanId::from_bytes(sc.span_id().to_bytes())?,
            sc.trace_flags().to_u8(),
        ))
    }
}

/// A random, non-zero 64-bit number: SipHash, keyed per thread at random
/// by the standard library, over a process-wide counter. Not for secrets;
/// enough for ids that must not collide.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let n = h.finish();
        if n != 0 {
            return n;
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
    }
}

fn ascii(bytes: &[u8]) -> &str {
    // Only ever hex digits and dashes.
    std::str::from_utf8(bytes).unwrap_or("")
}

fn hex_digit(b: &[u8], at: usize) -> Result<u8, TraceParseError> {
    match b[at] {
        c @ b'0'..=b'9' => Ok(c - b'0'),
        c @ b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(TraceParseError::Malformed { at }),
    }
}

fn hex_byte(b: &[u8], at: usize) -> Result<u8, TraceParseError> {
    Ok((hex_digit(b, at)? << 4) | hex_digit(b, at + 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_parses_and_formats_back_the_same() {
        let ctx = TraceContext::parse(SAMPLE).unwrap();
        assert_eq!(
            ctx.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(ctx.span_id().to_string(), "00f067aa0ba902b7");
        assert_eq!(ctx.flags(), 1);
        assert!(ctx.is_sampled());
        assert_eq!(ctx.to_string(), SAMPLE);
        assert_eq!(&ctx.to_header()[..], SAMPLE.as_bytes());
        let json = serde_json::to_string(&ctx).unwrap();
        assert_eq!(json, format!("\"{SAMPLE}\""));
        assert_eq!(serde_json::from_str::<TraceContext>(&json).unwrap(), ctx);
    }

    #[test]
    fn malformed_traceparents_are_refused_with_the_reason_and_never_panic() {
        let cases: &[(&str, TraceParseError)] = &[
            ("", TraceParseError::Length { found: 0 }),
            ("00-4bf9", TraceParseError::Length { found: 7 }),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                TraceParseError::Malformed { at: 4 },
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParseError::Malformed { at: 2 },
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
                TraceParseError::Malformed { at: 51 },
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParseError::Version,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                TraceParseError::Length { found: 61 },
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                TraceParseError::ZeroTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                TraceParseError::ZeroSpanId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u{e9}",
                TraceParseError::Length { found: 56 },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                TraceContext::parse(input).as_ref(),
                Err(expected),
                "{input:?}"
            );
            assert!(!expected.to_string().is_empty());
        }
        // Multi-byte characters at any position: an error, not a panic.
        for at in 0..55 {
            let mut s = SAMPLE.to_owned();
            s.replace_range(at..=at, "\u{e9}");
            assert!(TraceContext::parse(&s).is_err(), "{s}");
        }
        assert!(serde_json::from_str::<TraceContext>("\"00-zz\"").is_err());
    }

    #[test]
    fn a_later_version_is_read_as_far_as_version_00_goes() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        let ctx = TraceContext::parse(later).unwrap();
        assert_eq!(ctx.to_string(), SAMPLE);
    }

    #[test]
    fn new_ids_are_valid_and_differ() {
        let a = TraceContext::root();
        let b = TraceContext::root();
        assert_ne!(a.trace_id(), b.trace_id());
        assert_ne!(a.span_id(), b.span_id());
        let child = a.child();
        assert_eq!(child.trace_id(), a.trace_id());
        assert_ne!(child.span_id(), a.span_id());
        assert_eq!(TraceContext::parse(&a.to_string()).unwrap(), a);
        assert!(TraceId::from_bytes([0; 16]).is_none());
        assert!(SpanId::from_bytes([0; 8]).is_none());
    }

    #[test]
    fn a_malformed_field_reads_as_no_context() {
        #[derive(Deserialize)]
        struct Holder {
            #[serde(default, deserialize_with = "lenient")]
            tp: Option<TraceContext>,
        }
        let bad: Holder = serde_json::from_str(r#"{"tp": "nonsense"}"#).unwrap();
        assert_eq!(bad.tp, None);
        for other in [
            "7",
            "-7",
            "7.5",
            "true",
            "null",
            "[1, [2]]",
            r#"{"a": {"b": 1}}"#,
        ] {
            let read: Holder = serde_json::from_str(&format!(r#"{{"tp": {other}, "n": 1}}"#))
                .unwrap_or_else(|e| panic!("{other}: {e}"));
            assert_eq!(read.tp, None, "{other}");
        }
        let escaped: Holder = serde_json::from_str(&format!(
            r#"{{"tp": "{}\u0034{}"}}"#,
            &SAMPLE[..3],
            &SAMPLE[4..]
        ))
        .unwrap();
        assert_eq!(escaped.tp.map(|c| c.to_string()).as_deref(), Some(SAMPLE));
        let missing: Holder = serde_json::from_str("{}").unwrap();
        assert_eq!(missing.tp, None);
        let good: Holder = serde_json::from_str(&format!(r#"{{"tp": "{SAMPLE}"}}"#)).unwrap();
        assert_eq!(good.tp.map(|c| c.to_string()).as_deref(), Some(SAMPLE));
        assert_eq!(from_header(Some(b"junk")), None);
        assert!(from_header(Some(SAMPLE.as_bytes())).is_some());
        assert_eq!(from_header(None), None);
    }
}
