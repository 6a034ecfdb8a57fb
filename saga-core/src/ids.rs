//! Identifiers and time stamps shared by every part of the engine.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Declares a string identifier newtype with the usual conversions. The
/// string is shared (`Arc<str>`): ids are copied into many indexes (timers,
/// undo logs, views), and a copy is then a reference count, not an
/// allocation.
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps an existing identifier.
            pub fn new(id: impl Into<String>) -> Self {
                Self(Arc::from(id.into()))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(Arc::from(s))
            }
        }

        impl From<Arc<str>> for $name {
            fn from(s: Arc<str>) -> Self {
                Self(s)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(Arc::from(s))
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<De: serde::Deserializer<'de>>(d: De) -> Result<Self, De::Error> {
                // Straight from the input's text into the shared string: one
                // allocation, not a `String` and then its copy.
                deserialize_shared(d).map(Self)
            }
        }
    };
}

/// Reads a string into an `Arc<str>`, borrowing the input's text when
/// it can.
struct SharedStrVisitor;

impl serde::de::Visitor<'_> for SharedStrVisitor {
    type Value = Arc<str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Arc<str>, E> {
        Ok(Arc::from(s))
    }

    fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Arc<str>, E> {
        Ok(Arc::from(s))
    }

    fn visit_char<E: serde::de::Error>(self, c: char) -> Result<Arc<str>, E> {
        Ok(Arc::from(c.encode_utf8(&mut [0; 4]) as &str))
    }

    // Formats that hand strings over as bytes.
    fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Arc<str>, E> {
        std::str::from_utf8(b)
            .map(Arc::from)
            .map_err(|_| E::invalid_value(serde::de::Unexpected::Bytes(b), &self))
    }
}

/// Writes a shared string (for `serialize_with`).
pub(crate) fn serialize_shared<S: serde::Serializer>(
    s: &Arc<str>,
    ser: S,
) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s)
}

/// Reads a shared string in one allocation (for `deserialize_with`).
pub(crate) fn deserialize_shared<'de, De: serde::Deserializer<'de>>(
    d: De,
) -> Result<Arc<str>, De::Error> {
    d.deserialize_str(SharedStrVisitor)
}

/// One piece of a [`concat`]enated string.
pub(crate) enum Part<'a> {
    /// Text, as is.
    S(&'a str),
    /// A number, in decimal.
    N(u64),
}

/// `parts` one after the other, in one allocation of the right size: on
/// the engine's hot path (message ids, timer ids, history lines)
/// `format!` costs more than the text, growing its buffer as it goes.
pub(crate) fn concat(parts: &[Part<'_>]) -> String {
    let size = parts
        .iter()
        .map(|p| match p {
            Part::S(s) => s.len(),
            Part::N(_) => 20,
        })
        .sum();
    let mut out = String::with_capacity(size);
    push_parts(&mut out, parts);
    out
}

fn push_parts(out: &mut String, parts: &[Part<'_>]) {
    for p in parts {
        match p {
            Part::S(s) => out.push_str(s),
            Part::N(n) => {
                use std::fmt::Write;
                // Writing to a `String` cannot fail.
                let _ = write!(out, "{n}");
            }
        }
    }
}

thread_local! {
    /// The buffer [`concat_shared`] writes in, kept between calls.
    static BUFFER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// [`concat`] into a shared string (for ids), in one allocation: the
/// pieces are joined in a buffer kept by the thread, then copied once.
pub(crate) fn concat_shared(parts: &[Part<'_>]) -> Arc<str> {
    BUFFER.with(|buffer| match buffer.try_borrow_mut() {
        Ok(mut buffer) => {
            buffer.clear();
            push_parts(&mut buffer, parts);
            Arc::from(buffer.as_str())
        }
        // Only if a part's formatting called back in here: no buffer then.
        Err(_) => Arc::from(concat(parts)),
    })
}

string_id! {
    /// The identity of one saga instance (e.g. an order id).
    ///
    /// Runtimes use it as the message key, so every message of one saga lands on
    /// one partition, in order.
    SagaId
}

string_id! {
    /// The identity of one message.
    ///
    /// The engine derives message ids deterministically from the saga id, the
    /// step and the phase, so a message produced again after a crash carries the
    /// same id and receivers can deduplicate it.
    MessageId
}

/// A point in time: milliseconds since the Unix epoch.
///
/// The core never reads a clock; drivers pass the current `Timestamp` in,
/// and every timer the core schedules is a `Timestamp`, so it can be
/// persisted and re-armed after a restart.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp `millis` milliseconds after the Unix epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// The wall-clock time now (the only place the crate reads the system
    /// clock; the pure core never calls it).
    pub fn now() -> Self {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// This instant plus `d` (saturating).
    pub fn saturating_add(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self(self.0.saturating_add(ms))
    }

    /// The time elapsed from `earlier` to `self` (zero if `earlier` is later).
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC with milliseconds: `2026-11-27T18:20:32.123Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0 % 1_000;
        let secs = self.0 / 1_000;
        let (h, m, s) = (secs / 3_600 % 24, secs / 60 % 60, secs % 60);
        let (year, month, day) = civil_from_days(secs / 86_400);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z"
        )
    }
}

/// The proleptic Gregorian date `days` days after 1970-01-01 (the classic
/// era-based conversion: 400-year eras of 146,097 days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_joins_text_and_numbers() {
        use Part::{N, S};
        assert_eq!(concat(&[]), "");
        assert_eq!(
            concat(&[S("a:"), S("b/"), N(0), S("/x/"), N(u64::MAX)]),
            format!("a:b/0/x/{}", u64::MAX)
        );
        let shared = concat_shared(&[S("saga:"), S("id/"), N(42)]);
        assert_eq!(&*shared, "saga:id/42");
        // The thread's buffer is reused: a shorter id after a longer one.
        assert_eq!(&*concat_shared(&[S("x"), N(7)]), "x7");
    }

    #[test]
    fn ids_read_from_json_borrowed_escaped_or_from_a_value() {
        let plain: SagaId = serde_json::from_str(r#""order-1""#).unwrap();
        assert_eq!(plain.as_str(), "order-1");
        let escaped: MessageId = serde_json::from_str(r#""a\"b\u00e9""#).unwrap();
        assert_eq!(escaped.as_str(), "a\"b\u{e9}");
        let from_value: SagaId = serde_json::from_value(serde_json::json!("v-1")).unwrap();
        assert_eq!(from_value, SagaId::from("v-1"));
        assert!(
            serde_json::from_str::<SagaId>("7").is_err(),
            "a number is not an id"
        );
        // Formats that hand strings over as bytes.
        use serde::de::value::{BytesDeserializer, Error};
        let bytes = SagaId::deserialize(BytesDeserializer::<Error>::new(b"b-1")).unwrap();
        assert_eq!(bytes.as_str(), "b-1");
        assert!(SagaId::deserialize(BytesDeserializer::<Error>::new(&[0xff])).is_err());
    }

    #[test]
    fn timestamp_formats_as_rfc3339() {
        assert_eq!(Timestamp::EPOCH.to_string(), "1970-01-01T00:00:00.000Z");
        // 2026-11-27T18:20:32.123Z
        assert_eq!(
            Timestamp::from_millis(1_795_803_632_123).to_string(),
            "2026-11-27T18:20:32.123Z"
        );
    }

    #[test]
    fn timestamp_formats_leap_days_and_year_ends() {
        // 2024-02-29T23:59:59.999Z and 2000-12-31T00:00:00.000Z
        assert_eq!(
            Timestamp::from_millis(1_709_251_199_999).to_string(),
            "2024-02-29T23:59:59.999Z"
        );
        assert_eq!(
            Timestamp::from_millis(978_220_800_000).to_string(),
            "2000-12-31T00:00:00.000Z"
        );
    }

    #[test]
    fn timestamp_arithmetic_saturates() {
        let t = Timestamp::from_millis(1_000);
        assert_eq!(t.saturating_add(Duration::from_secs(2)).as_millis(), 3_000);
        assert_eq!(Timestamp::EPOCH.saturating_since(t), Duration::ZERO);
        assert_eq!(t.saturating_since(Timestamp::EPOCH), Duration::from_secs(1));
    }
}
