//! Identifiers and time stamps shared by every part of the engine.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A hash map for the drivers' hot lookups (by saga id, command id,
/// partition): foldhash instead of SipHash, a fraction of the cost per
/// lookup. Its seeds differ per process and per map (from the address
/// space's layout, the clock and a counter), so colliding keys cannot be
/// written in advance; unlike SipHash's, they are not meant to resist an
/// attacker who can measure lookups in the running process, which at
/// worst makes lookups slower.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The set counterpart of [`FastMap`].
pub(crate) type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

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

/// Reads a string into an `Arc<str>` made by its function (a plain copy,
/// or [`intern`]), from the input's text without an owned `String` first
/// when the input lends it.
struct SharedStrVisitor(fn(&str) -> Arc<str>);

impl serde::de::Visitor<'_> for SharedStrVisitor {
    type Value = Arc<str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Arc<str>, E> {
        Ok((self.0)(s))
    }

    fn visit_char<E: serde::de::Error>(self, c: char) -> Result<Arc<str>, E> {
        Ok((self.0)(c.encode_utf8(&mut [0; 4])))
    }

    // Formats that hand strings over as bytes.
    fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Arc<str>, E> {
        std::str::from_utf8(b)
            .map(self.0)
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
    d.deserialize_str(SharedStrVisitor(|s| Arc::from(s)))
}

/// Reads a text many instances repeat (a saga or step name, a timer id, a
/// history line) as the thread's shared copy of it (see [`intern`]): a
/// restored instance keeps no text of its own for them.
pub(crate) fn deserialize_interned<'de, De: serde::Deserializer<'de>>(
    d: De,
) -> Result<Arc<str>, De::Error> {
    d.deserialize_str(SharedStrVisitor(intern))
}

/// How many texts [`intern`] keeps per thread in each of its two
/// generations.
const INTERNED_MAX: usize = 1024;

/// The longest text [`intern`] keeps: longer ones (error messages, notes)
/// rarely repeat.
const INTERNED_MAX_LEN: usize = 128;

/// The texts [`intern`] shares, in two generations: a text is looked up
/// in both, and one found in the old generation moves to the new one. When
/// the new generation is full it becomes the old one (the old one is
/// dropped): texts that keep repeating stay, texts seen once (a line with
/// an error in it) leave after two turns. At most `2 × INTERNED_MAX` texts
/// of at most `INTERNED_MAX_LEN` bytes: under 400 KiB per thread with the
/// tables themselves, kept for the thread's life.
#[derive(Default)]
struct Interned {
    new: crate::ids::FastSet<Arc<str>>,
    old: crate::ids::FastSet<Arc<str>>,
}

impl Interned {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.new.get(s) {
            return shared.clone();
        }
        let shared = self.old.take(s).unwrap_or_else(|| Arc::from(s));
        if self.new.len() >= INTERNED_MAX {
            self.old = std::mem::take(&mut self.new);
        }
        self.new.insert(shared.clone());
        shared
    }
}

thread_local! {
    /// Per thread: no lock.
    static INTERNED: std::cell::RefCell<Interned> = std::cell::RefCell::new(Interned::default());
}

/// `s` as a shared string: the same allocation as the last time this
/// thread interned the same text, unless the thread's table has let it go
/// since (see [`Interned`]). The texts every instance of a saga writes
/// alike ("step `reserve`: forward command 1 sent (attempt 1)") are kept
/// once per thread, not once per instance, and a hit allocates nothing.
/// Texts longer than `INTERNED_MAX_LEN` are copied, not kept.
pub(crate) fn intern(s: &str) -> Arc<str> {
    if s.len() > INTERNED_MAX_LEN {
        return Arc::from(s);
    }
    INTERNED
        .try_with(|table| match table.try_borrow_mut() {
            Ok(mut table) => table.get(s),
            Err(_) => Arc::from(s),
        })
        // The thread is ending: its table is gone.
        .unwrap_or_else(|_| Arc::from(s))
}

/// [`concat`] through [`intern`]: for texts that repeat across instances
/// (history lines, timer ids), not for unique ones (message ids).
pub(crate) fn concat_interned(parts: &[Part<'_>]) -> Arc<str> {
    BUFFER
        .try_with(|buffer| match buffer.try_borrow_mut() {
            Ok(mut buffer) => {
                buffer.clear();
                push_parts(&mut buffer, parts);
                intern(&buffer)
            }
            Err(_) => intern(&concat(parts)),
        })
        .unwrap_or_else(|_| intern(&concat(parts)))
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
    /// The buffer [`concat_shared`] and [`concat_interned`] write in, kept
    /// between calls.
    static BUFFER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// [`concat`] into a shared string (for ids), in one allocation: the
/// pieces are joined in a buffer kept by the thread, then copied once.
pub(crate) fn concat_shared(parts: &[Part<'_>]) -> Arc<str> {
    BUFFER
        .try_with(|buffer| match buffer.try_borrow_mut() {
            Ok(mut buffer) => {
                buffer.clear();
                push_parts(&mut buffer, parts);
                Arc::from(buffer.as_str())
            }
            // Only if a part's formatting called back in here: no buffer then.
            Err(_) => Arc::from(concat(parts)),
        })
        // The thread is ending: its buffer is gone.
        .unwrap_or_else(|_| Arc::from(concat(parts)))
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
    fn interned_texts_stay_shared_while_they_repeat_long_ones_are_not_kept_and_the_table_is_bounded(
    ) {
        use Part::{N, S};
        let a = intern("step `reserve`: succeeded");
        let b = concat_interned(&[S("step `reserve`: "), S("succeeded")]);
        assert_eq!(&*b, "step `reserve`: succeeded");
        assert!(Arc::ptr_eq(&a, &b), "the same text is the same allocation");
        assert_eq!(&*concat_interned(&[S("x/"), N(3)]), "x/3");
        // A long text is copied, not kept.
        let long = "e".repeat(INTERNED_MAX_LEN + 1);
        assert!(!Arc::ptr_eq(&intern(&long), &intern(&long)));
        // A text that keeps repeating stays shared while one-off texts
        // pass through, many times the bound of a generation; the table
        // holds at most two generations.
        let hot = intern("step `reserve`: forward command 1 sent (attempt 1)");
        for i in 0..5 * INTERNED_MAX {
            assert_eq!(&*intern(&format!("line {i}")), format!("line {i}"));
            if i % 100 == 0 {
                let again = intern("step `reserve`: forward command 1 sent (attempt 1)");
                assert!(Arc::ptr_eq(&hot, &again), "after {i} one-off texts");
            }
        }
        let held = INTERNED.with(|t| {
            let t = t.borrow();
            (t.new.len(), t.old.len())
        });
        assert!(held.0 <= INTERNED_MAX && held.1 <= INTERNED_MAX, "{held:?}");
        // A one-off text is gone two generations later.
        let once = intern("once");
        for i in 0..2 * INTERNED_MAX + 1 {
            intern(&format!("other {i}"));
        }
        assert!(!Arc::ptr_eq(&once, &intern("once")));
        // Read from JSON, text, escapes or bytes, through the table.
        #[derive(serde::Deserialize)]
        struct Line(#[serde(deserialize_with = "deserialize_interned")] Arc<str>);
        let one: Line = serde_json::from_str(r#""started""#).unwrap();
        let two: Line = serde_json::from_str(r#""started""#).unwrap();
        assert!(Arc::ptr_eq(&one.0, &two.0));
        let escaped: Line = serde_json::from_str(r#""a\"b""#).unwrap();
        assert_eq!(&*escaped.0, "a\"b");
        use serde::de::value::{BytesDeserializer, Error};
        let bytes = deserialize_interned(BytesDeserializer::<Error>::new(b"started")).unwrap();
        assert!(Arc::ptr_eq(&bytes, &one.0));
        assert!(deserialize_interned(BytesDeserializer::<Error>::new(&[0xff])).is_err());
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
