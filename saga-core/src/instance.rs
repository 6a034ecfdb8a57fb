//! A saga instance: a plain, serializable value.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{SagaId, Timestamp};
use crate::message::{EncodedEnvelope, Phase};
use crate::trace::TraceContext;

/// Where a saga instance stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SagaStatus {
    /// Running its steps forward.
    Running,
    /// Undoing the steps that took effect, in reverse order.
    Compensating,
    /// Every step succeeded (final).
    Completed,
    /// A step failed and every step that took effect was compensated (final).
    Compensated,
    /// Stopped for an operator: retries of a step after the point of no
    /// return or of a compensation ran out, or the pivot's outcome is
    /// unknown. A dead letter says why. A late reply to the parked step
    /// resumes it; otherwise an [`Operation`](crate::Operation) does.
    Parked {
        /// Why the saga is parked.
        reason: String,
    },
}

impl SagaStatus {
    /// Whether the saga has finished for good (completed or compensated).
    pub fn is_final(&self) -> bool {
        matches!(self, SagaStatus::Completed | SagaStatus::Compensated)
    }

    /// Whether the saga is done for now: final or parked.
    pub fn is_settled(&self) -> bool {
        self.is_final() || self.is_parked()
    }

    /// Whether the saga waits for an operator.
    pub fn is_parked(&self) -> bool {
        matches!(self, SagaStatus::Parked { .. })
    }

    /// A short name: `running`, `compensating`, `completed`, `compensated`, `parked`.
    pub fn name(&self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Parked { .. } => "parked",
        }
    }
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SagaStatus::Parked { reason } => write!(f, "parked: {reason}"),
            other => f.write_str(other.name()),
        }
    }
}

/// What is known of one step of one saga instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StepState {
    /// Not started.
    Pending,
    /// Started, not finished (waiting for a reply or a retry).
    Running,
    /// Took effect.
    Succeeded,
    /// Failed definitively: took no effect (or, for a retryable step that
    /// gave up and let the saga continue, gave up).
    Failed,
    /// Gave up without knowing whether it took effect (the last attempt of a
    /// remote step timed out or failed with a retryable error): it is
    /// compensated as if it had, so compensations must tolerate "nothing to
    /// undo". A pivot in this state parks the saga.
    Indeterminate,
    /// Its compensation is running.
    Compensating,
    /// Its compensation succeeded (or there was nothing to undo).
    Compensated,
    /// An operator skipped it.
    Skipped,
}

impl StepState {
    /// Whether the step (may have) taken effect and not been undone.
    pub fn needs_compensation(self) -> bool {
        matches!(
            self,
            StepState::Succeeded | StepState::Indeterminate | StepState::Compensating
        )
    }
}

/// Per-step bookkeeping of a saga instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StepRecord {
    /// The step's name (shared with the definition and every version of
    /// the instance, or, read back, with the instances the same thread
    /// read: copying the steps copies no text).
    #[serde(
        serialize_with = "crate::ids::serialize_shared",
        deserialize_with = "crate::ids::deserialize_interned"
    )]
    pub name: std::sync::Arc<str>,
    /// Where it stands.
    pub state: StepState,
    /// Attempts of the action in the current retry budget (an operator's
    /// retry starts a new budget).
    pub attempts: u32,
    /// When the first attempt of the current budget started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_attempt_at: Option<Timestamp>,
    /// Attempts of the compensation in the current retry budget.
    // Always written: earlier versions of this crate require the field.
    #[serde(default)]
    pub compensation_attempts: u32,
    /// When the first attempt of the compensation's current budget started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_compensation_at: Option<Timestamp>,
    /// Times the action or compensation ran in the current budget, counting
    /// a participant's local retries (its failure replies say how many):
    /// the retry count of the step's dead letter.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub executions: u32,
    /// Commands sent for this step in all, action and compensation,
    /// operator retries included: numbers every command (its
    /// [`Envelope::attempt`](crate::Envelope::attempt)) so each attempt is a new message.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sends: u32,
    /// The last error seen, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Whether an earlier attempt of the action ended without a verdict
    /// (no reply in time, or a retryable failure on its last delivery), so
    /// it may still take effect. A step that then gives up is compensated
    /// as if its outcome were unknown, whatever its last attempt said.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uncertain: bool,
}

impl StepRecord {
    pub(crate) fn new(name: std::sync::Arc<str>) -> Self {
        Self {
            name,
            state: StepState::Pending,
            attempts: 0,
            first_attempt_at: None,
            compensation_attempts: 0,
            first_compensation_at: None,
            executions: 0,
            sends: 0,
            last_error: None,
            uncertain: false,
        }
    }
}

/// A timer's identity within its saga instance.
///
/// The text is shared: copying a timer (into a transition's instance, an
/// effect, a runtime's timer queue) copies no text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TimerId(
    #[serde(
        serialize_with = "crate::ids::serialize_shared",
        deserialize_with = "crate::ids::deserialize_interned"
    )]
    pub std::sync::Arc<str>,
);

impl TimerId {
    /// A timer id from its text.
    pub fn new(id: impl Into<std::sync::Arc<str>>) -> Self {
        Self(id.into())
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for TimerId {
    fn from(id: &str) -> Self {
        Self::new(id)
    }
}

impl From<String> for TimerId {
    fn from(id: String) -> Self {
        Self::new(id)
    }
}

impl AsRef<str> for TimerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TimerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a timer is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum TimerKind {
    /// The deadline of one attempt of a remote step or compensation.
    AttemptDeadline {
        /// The step's index.
        step: usize,
        /// Action or compensation.
        phase: Phase,
        /// The command number ([`Envelope::attempt`](crate::Envelope::attempt)) it bounds.
        attempt: u32,
    },
    /// The end of a retry backoff: the next attempt starts.
    Backoff {
        /// The step's index.
        step: usize,
        /// Action or compensation.
        phase: Phase,
    },
    /// The deadline of the whole saga.
    SagaDeadline,
}

/// A persisted timer: part of the saga instance, re-armed after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Timer {
    /// Unique within the saga instance.
    pub id: TimerId,
    /// When it fires.
    pub fire_at: Timestamp,
    /// What it is for.
    pub kind: TimerKind,
}

/// The command a saga waits on a reply for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Awaiting {
    /// The step's index.
    pub step: usize,
    /// Action or compensation.
    pub phase: Phase,
    /// The number of the latest command sent ([`Envelope::attempt`](crate::Envelope::attempt)).
    pub attempt: u32,
    /// Whether that command is still in flight: no reply and no deadline
    /// yet. Once it has been judged (failed, timed out), a success reply to
    /// it (or to an earlier attempt) is still applied; a failure is only
    /// recorded, except that a permanent one settles a parked pivot (it
    /// took no effect: the saga compensates).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_flight: bool,
    /// The command as sent, encoded (kept for the dead letter if it comes
    /// to that; [`EncodedEnvelope::decode`] reads it).
    pub command: EncodedEnvelope,
}

/// A history line's status read back: one of [`SagaStatus::name`]'s names
/// is borrowed from it; anything else is kept as read.
fn status_name<'de, De: serde::Deserializer<'de>>(
    d: De,
) -> Result<std::borrow::Cow<'static, str>, De::Error> {
    const NAMES: [&str; 5] = [
        "running",
        "compensating",
        "completed",
        "compensated",
        "parked",
    ];
    let read = String::deserialize(d)?;
    Ok(match NAMES.iter().find(|n| **n == read) {
        Some(name) => std::borrow::Cow::Borrowed(name),
        None => std::borrow::Cow::Owned(read),
    })
}

/// One line of a saga's history: what happened, when, and who did it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HistoryEntry {
    /// When.
    pub at: Timestamp,
    /// The saga's status after it ([`SagaStatus::name`]): borrowed when
    /// written or read back, so copying a history copies no status text.
    #[serde(deserialize_with = "status_name")]
    pub status: std::borrow::Cow<'static, str>,
    /// What happened (shared: copying a history copies no text).
    #[serde(
        serialize_with = "crate::ids::serialize_shared",
        deserialize_with = "crate::ids::deserialize_interned"
    )]
    pub what: std::sync::Arc<str>,
    /// The operator who caused it, for an operator's action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// The operator's note, for an operator's action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// For `skip_serializing_if`: a zero counter is left out of a state record
/// (and read back as zero).
fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

/// The most history entries kept per instance (older ones are dropped).
pub const MAX_HISTORY: usize = 256;

/// One saga instance: the user's data plus the engine's bookkeeping.
///
/// A plain value: serialize it to persist it, deserialize it to resume,
/// with serde_json (text, bytes or a `serde_json::Value`: the state of a
/// saga is JSON, and the awaited command is kept as its JSON text, see
/// [`EncodedEnvelope`]). Instances are made by [`SagaDefinition::start`](crate::SagaDefinition::start)
/// and changed only by the engine.
///
/// The texts instances write alike (the saga and step names, timer ids,
/// most history lines) are shared between them: the ones an instance
/// writes come from its definition or from a small table of texts each
/// thread keeps, and an instance read back takes them from that table
/// too (up to 2,048 texts of up to 128 bytes per thread, for the
/// thread's life). Copies and equality are unaffected: they are plain
/// `Arc<str>`s, equal by their text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SagaInstance<D> {
    /// The instance's id.
    pub id: SagaId,
    /// The saga type's name.
    #[serde(
        serialize_with = "crate::ids::serialize_shared",
        deserialize_with = "crate::ids::deserialize_interned"
    )]
    pub saga: std::sync::Arc<str>,
    /// The user's saga data.
    pub data: D,
    /// Where it stands.
    pub status: SagaStatus,
    /// Forward or compensating (kept while parked, to resume the right way).
    pub phase: Phase,
    /// The index of the step being run or compensated.
    pub cursor: usize,
    /// One record per step of the definition.
    pub steps: Vec<StepRecord>,
    /// The command waiting on a reply, if any.
    // Left out when none: every version reads a missing field as none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting: Option<Awaiting>,
    /// Armed timers.
    // Always written: earlier versions of this crate require the field.
    #[serde(default)]
    pub timers: Vec<Timer>,
    /// Why the saga is compensating or parked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// How many events and fire-and-forget commands the saga has emitted
    /// (numbers their ids).
    // Always written: earlier versions of this crate require the field.
    #[serde(default)]
    pub event_seq: u64,
    /// Bumped on every transition (optimistic concurrency for stores).
    pub version: u64,
    /// When it started.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// What happened, oldest first (at most [`MAX_HISTORY`] entries).
    pub history: Vec<HistoryEntry>,
    /// The trace the saga runs in: its trace id and the span that started
    /// it. Its messages carry it (with their sender's span id). `None` for
    /// sagas started before traces were kept (and left out then).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::trace::lenient"
    )]
    pub trace: Option<TraceContext>,
}

impl<D: Clone> SagaInstance<D> {
    /// Records written before [`Awaiting::in_flight`] existed read it as
    /// `false`, which would leave their command judged with nothing to
    /// wake the saga. A saga running or compensating keeps a judged
    /// command only while the back-off to its next attempt is armed
    /// (otherwise the step gave up: the saga parked, or dropped the
    /// command to compensate or move on): without that back-off, the
    /// command is in flight.
    pub(crate) fn infer_in_flight(&mut self) {
        if !matches!(self.status, SagaStatus::Running | SagaStatus::Compensating) {
            return;
        }
        let Some(a) = self.awaiting.as_mut().filter(|a| !a.in_flight) else {
            return;
        };
        let backing_off = self.timers.iter().any(|t| {
            matches!(t.kind, TimerKind::Backoff { step, phase } if step == a.step && phase == a.phase)
        });
        if !backing_off {
            a.in_flight = true;
        }
    }

    /// A copy for a transition to change: without the awaited command
    /// unless `with_awaiting` (a transition on a reply usually drops it),
    /// and with room
    /// for the history lines a transition adds (a copy has none, and the
    /// first line would copy the history once more to grow it).
    pub(crate) fn clone_for_transition(&self, with_awaiting: bool) -> Self {
        // Every field named: a field added later must be copied here too.
        let SagaInstance {
            id,
            saga,
            data,
            status,
            phase,
            cursor,
            steps,
            awaiting,
            timers,
            failure,
            event_seq,
            version,
            created_at,
            updated_at,
            history,
            trace,
        } = self;
        let room = (history.len() + 4).min(MAX_HISTORY.max(history.len()));
        let mut copied = Vec::with_capacity(room);
        copied.extend_from_slice(history);
        SagaInstance {
            id: id.clone(),
            saga: saga.clone(),
            data: data.clone(),
            status: status.clone(),
            phase: *phase,
            cursor: *cursor,
            steps: steps.clone(),
            awaiting: if with_awaiting {
                awaiting.clone()
            } else {
                None
            },
            timers: timers.clone(),
            failure: failure.clone(),
            event_seq: *event_seq,
            version: *version,
            created_at: *created_at,
            updated_at: *updated_at,
            trace: *trace,
            history: copied,
        }
    }
}

impl<D> SagaInstance<D> {
    /// The earliest armed timer, if any.
    pub fn next_timer(&self) -> Option<&Timer> {
        self.timers.iter().min_by_key(|t| t.fire_at)
    }

    /// The armed timer with this id, if any.
    pub fn timer(&self, id: &TimerId) -> Option<&Timer> {
        self.timers.iter().find(|t| &t.id == id)
    }

    /// The record of the step named `name`.
    pub fn step(&self, name: &str) -> Option<&StepRecord> {
        self.steps.iter().find(|s| &*s.name == name)
    }

    /// The name of the step being run, compensated, or parked on (the
    /// last step once the saga completed).
    pub fn current_step(&self) -> Option<&str> {
        let i = self.cursor.min(self.steps.len().checked_sub(1)?);
        Some(&*self.steps[i].name)
    }

    pub(crate) fn record(&mut self, at: Timestamp, what: impl Into<std::sync::Arc<str>>) {
        self.record_by(at, what, None, None);
    }

    pub(crate) fn record_by(
        &mut self,
        at: Timestamp,
        what: impl Into<std::sync::Arc<str>>,
        operator: Option<String>,
        note: Option<String>,
    ) {
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(0);
        }
        self.history.push(HistoryEntry {
            at,
            status: std::borrow::Cow::Borrowed(self.status.name()),
            what: what.into(),
            operator,
            note,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_status_read_back_is_borrowed_when_it_is_a_known_name() {
        let known: HistoryEntry =
            serde_json::from_str(r#"{"at":1,"status":"parked","what":"x"}"#).unwrap();
        assert!(matches!(known.status, std::borrow::Cow::Borrowed("parked")));
        let other: HistoryEntry =
            serde_json::from_str(r#"{"at":1,"status":"paused","what":"x"}"#).unwrap();
        assert!(matches!(other.status, std::borrow::Cow::Owned(ref s) if s == "paused"));
    }
}
