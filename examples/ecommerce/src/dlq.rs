//! The DLQ processor: lists and inspects dead letters, and per message
//! retries it (optionally with a corrected payload), alerts ops, discards
//! it, or sends the customer an SMS instead. Every action is archived with
//! what was done, by whom and when.
//!
//! It reads the dead-letter channels as a projection and gives each dead
//! letter a short id (`dlq-1`, `dlq-2` …) in arrival order; the full
//! dead-letter id is accepted too. On Kafka the `dlq` process reads
//! `notifications.dlq` and `orders.dlq` from the beginning into this view on
//! every start (the topics keep dead letters 30 days), and its actions
//! publish through the runtime. The audit archive lives in the process
//! (a production processor would write it to a topic of its own).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use saga_core::{Clock, DeadLetter, Envelope, MessageId, MessageKind, Timestamp};
use serde::Serialize;
use serde_json::Value;

use crate::messages::{
    NotificationEvent, NotificationRequest, NOTIFICATIONS_DLQ, NOTIFICATIONS_EVENTS, ORDERS_DLQ,
};

/// The channels the processor reads (design names; see `Topics`).
pub const CHANNELS: &[&str] = &[NOTIFICATIONS_DLQ, ORDERS_DLQ];

/// How the processor publishes (a retried command, an SMS event):
/// asynchronously, failing with [`DlqError::Unavailable`] when the runtime
/// cannot take it now, [`DlqError::Refused`] when it never will.
pub type Publish = Arc<dyn Fn(Envelope) -> BoxFuture<'static, Result<(), DlqError>> + Send + Sync>;

/// What an action does once checked, before it is archived.
struct Plan {
    note: String,
    new_message_id: Option<String>,
    publish: Option<Envelope>,
    sms: Option<Sms>,
}

/// What an operator did with a dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Sent the original command again (maybe corrected), under a new id.
    Retry,
    /// Dropped it on purpose.
    Discard,
    /// Raised an alert for the ops team (the message stays open).
    Alert,
    /// Told the customer by SMS instead.
    Sms,
}

impl Action {
    /// Whether the dead letter is closed after this action.
    pub fn closes(self) -> bool {
        !matches!(self, Action::Alert)
    }
}

/// One archived action.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ArchiveEntry {
    /// The short id of the dead letter.
    pub dlq_id: String,
    /// The dead letter's own id.
    pub dead_letter_id: String,
    /// What was done.
    pub action: Action,
    /// Who did it.
    pub by: String,
    /// When.
    #[serde(serialize_with = "crate::messages::rfc3339")]
    pub at: Timestamp,
    /// The operator's note, or what happened ("SMS to …").
    pub note: String,
    /// For a retry: the id of the message sent again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_message_id: Option<String>,
}

/// A dead letter as the processor lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entry {
    /// The short id (`dlq-1`).
    pub dlq_id: String,
    /// `open`, `alerted`, or the closing action (`retried`, `discarded`, `sms`).
    pub status: String,
    /// The order (the saga id of the original message).
    pub order_id: String,
    /// When the last attempt failed, as RFC 3339 text.
    pub failure_time: String,
    /// The dead letter with its metadata and original message.
    pub dead_letter: DeadLetter,
    /// What was done with it, oldest first.
    pub actions: Vec<ArchiveEntry>,
}

/// Why an action was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum DlqError {
    /// No dead letter with that id.
    NotFound(String),
    /// The dead letter was already closed by an earlier action.
    Closed(String),
    /// The action does not apply to this dead letter.
    Invalid(String),
    /// The runtime could not take the message; nothing was done, retry.
    Unavailable(String),
    /// The runtime refused the message for want of an authorization (the
    /// service may not write the topic: an ACL is missing); nothing was
    /// done, and retrying does not help until the ACL is granted.
    Refused(String),
}

impl std::fmt::Display for DlqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DlqError::NotFound(m)
            | DlqError::Closed(m)
            | DlqError::Invalid(m)
            | DlqError::Unavailable(m)
            | DlqError::Refused(m) => f.write_str(m),
        }
    }
}

/// An SMS sent by the fallback channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Sms {
    /// The customer.
    pub to: String,
    /// The text.
    pub text: String,
}

/// The fake SMS gateway (always delivers); keeps what it sent.
#[derive(Clone, Default)]
pub struct FakeSms {
    sent: Arc<Mutex<Vec<Sms>>>,
}

impl FakeSms {
    /// Sends `sms`.
    pub fn send(&self, sms: Sms) {
        tracing::info!(to = %sms.to, "SMS sent");
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sms);
    }

    /// Every SMS sent.
    pub fn sent(&self) -> Vec<Sms> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[derive(Default)]
struct State {
    seen: HashSet<MessageId>,
    entries: Vec<(DeadLetter, Vec<ArchiveEntry>)>,
    alerts: Vec<ArchiveEntry>,
}

/// The DLQ processor. Cheap to clone (shared).
#[derive(Clone)]
pub struct DlqProcessor {
    state: Arc<Mutex<State>>,
    /// Serializes actions: one dead letter is never handled twice even
    /// while a publish is in flight.
    acting: Arc<tokio::sync::Mutex<()>>,
    publish: Publish,
    clock: Clock,
    sms: FakeSms,
    events: String,
}

impl DlqProcessor {
    /// A processor that sends messages with `publish` and SMS with `sms`.
    pub fn new(publish: Publish, clock: Clock, sms: FakeSms) -> Self {
        Self {
            state: Arc::default(),
            acting: Arc::default(),
            publish,
            clock,
            sms,
            events: NOTIFICATIONS_EVENTS.into(),
        }
    }

    /// Publishes `NOTIFICATION_SENT` (SMS) on `channel` instead of
    /// `notifications.events`.
    pub fn events_on(mut self, channel: impl Into<String>) -> Self {
        self.events = channel.into();
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The projection handler: takes in a dead-letter envelope (once per id).
    pub fn ingest(&self, env: &Envelope) {
        let Ok(dead) = DeadLetter::from_envelope(env) else {
            tracing::warn!(message_id = %env.id, channel = %env.channel, "not a dead letter: skipped");
            return;
        };
        let mut st = self.lock();
        if st.seen.insert(env.id.clone()) {
            tracing::warn!(dead_letter = %dead.id, source = %dead.source, reason = %dead.reason, "dead letter received");
            st.entries.push((dead, Vec::new()));
        }
    }

    fn entry(&self, index: usize, dead: &DeadLetter, actions: &[ArchiveEntry]) -> Entry {
        let status = match actions.iter().rev().find(|a| a.action.closes()) {
            Some(a) => match a.action {
                Action::Retry => "retried",
                Action::Discard => "discarded",
                Action::Sms => "sms",
                Action::Alert => "alerted",
            },
            None if actions.iter().any(|a| a.action == Action::Alert) => "alerted",
            None => "open",
        };
        Entry {
            dlq_id: format!("dlq-{}", index + 1),
            status: status.into(),
            order_id: dead.original.saga_id.to_string(),
            failure_time: dead.failure_timestamp.to_string(),
            dead_letter: dead.clone(),
            actions: actions.to_vec(),
        }
    }

    /// Every dead letter, oldest first.
    pub fn list(&self) -> Vec<Entry> {
        let st = self.lock();
        st.entries
            .iter()
            .enumerate()
            .map(|(i, (d, a))| self.entry(i, d, a))
            .collect()
    }

    /// Dead letters no action has closed yet.
    pub fn open_count(&self) -> usize {
        self.list()
            .iter()
            .filter(|e| e.status == "open" || e.status == "alerted")
            .count()
    }

    fn index_of(&self, st: &State, id: &str) -> Option<usize> {
        if let Some(n) = id
            .strip_prefix("dlq-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            if n >= 1 && n <= st.entries.len() {
                return Some(n - 1);
            }
        }
        st.entries.iter().position(|(d, _)| d.id.as_str() == id)
    }

    /// One dead letter, by short or full id.
    pub fn get(&self, id: &str) -> Option<Entry> {
        let st = self.lock();
        let i = self.index_of(&st, id)?;
        let (d, a) = &st.entries[i];
        Some(self.entry(i, d, a))
    }

    /// Every action taken, oldest first.
    pub fn archive(&self) -> Vec<ArchiveEntry> {
        let mut all: Vec<ArchiveEntry> = self
            .lock()
            .entries
            .iter()
            .flat_map(|(_, a)| a.clone())
            .collect();
        all.sort_by_key(|a| a.at);
        all
    }

    /// Alerts raised, oldest first.
    pub fn alerts(&self) -> Vec<ArchiveEntry> {
        self.lock().alerts.clone()
    }

    /// Runs `action` on dead letter `id`: checks it is open, lets `plan`
    /// decide what to do, publishes (outside the state lock), then archives
    /// the result. Nothing is archived if the publish fails.
    async fn act(
        &self,
        id: &str,
        action: Action,
        by: &str,
        plan: impl FnOnce(&DeadLetter, Timestamp) -> Result<Plan, DlqError>,
    ) -> Result<ArchiveEntry, DlqError> {
        let _acting = self.acting.lock().await;
        let now = self.clock.now();
        let (i, dead_id, plan) = {
            let st = self.lock();
            let i = self
                .index_of(&st, id)
                .ok_or_else(|| DlqError::NotFound(format!("no dead letter `{id}`")))?;
            let (dead, actions) = &st.entries[i];
            if let Some(closed) = actions.iter().find(|a| a.action.closes()) {
                return Err(DlqError::Closed(format!(
                    "dead letter `dlq-{}` was already handled: {:?} by {} at {}",
                    i + 1,
                    closed.action,
                    closed.by,
                    closed.at
                )));
            }
            (i, dead.id.to_string(), plan(dead, now)?)
        };
        if let Some(env) = plan.publish {
            (self.publish)(env).await?;
        }
        if let Some(sms) = plan.sms {
            self.sms.send(sms);
        }
        let entry = ArchiveEntry {
            dlq_id: format!("dlq-{}", i + 1),
            dead_letter_id: dead_id,
            action,
            by: if by.trim().is_empty() {
                "anonymous".into()
            } else {
                by.to_owned()
            },
            at: now,
            note: plan.note,
            new_message_id: plan.new_message_id,
        };
        tracing::info!(dlq_id = %entry.dlq_id, action = ?action, by = %entry.by, "dead letter handled");
        let mut st = self.lock();
        st.entries[i].1.push(entry.clone());
        if action == Action::Alert {
            st.alerts.push(entry.clone());
        }
        Ok(entry)
    }

    /// Sends the original command again to its original channel under a
    /// new message id, with `corrected` as its payload if given. The
    /// retried command expects no reply (the saga that sent it has moved on).
    /// The operator's `note` (may be empty) is added to the archive's.
    pub async fn retry(
        &self,
        id: &str,
        corrected: Option<Value>,
        by: &str,
        note: &str,
    ) -> Result<ArchiveEntry, DlqError> {
        let operator_note = note;
        self.act(id, Action::Retry, by, |dead, now| {
            let original = &dead.original;
            if original.kind != MessageKind::Command || original.channel.ends_with(".local") {
                return Err(DlqError::Invalid(format!(
                    "dead letter `{}` holds a {} on `{}`, not a command a participant can take again; resume its saga instead",
                    dead.id,
                    original.kind.as_str(),
                    original.channel
                )));
            }
            let corrected_note = corrected.is_some();
            let mut env = original.clone();
            // A dead letter is retried at most once (retrying closes it), so
            // this id is new; a retry that fails again is a new dead letter.
            env.id = MessageId::new(format!("{}/dlq-retry", original.id));
            env.attempt = 1;
            env.reply_to = None;
            env.timestamp = now;
            if let Some(payload) = corrected {
                env.payload = payload;
            }
            let new_id = env.id.to_string();
            let note = format!(
                "sent again to `{}`{}",
                env.channel,
                if corrected_note {
                    " with a corrected payload"
                } else {
                    ""
                }
            );
            Ok(Plan {
                note: with_note(note, operator_note),
                new_message_id: Some(new_id),
                publish: Some(env),
                sms: None,
            })
        })
        .await
    }

    /// Closes the dead letter without doing anything.
    pub async fn discard(&self, id: &str, by: &str, note: &str) -> Result<ArchiveEntry, DlqError> {
        self.act(id, Action::Discard, by, |_, _| {
            Ok(Plan::note(non_empty(note, "discarded")))
        })
        .await
    }

    /// Raises an alert for the ops team; the dead letter stays open.
    pub async fn alert(&self, id: &str, by: &str, note: &str) -> Result<ArchiveEntry, DlqError> {
        self.act(id, Action::Alert, by, |dead, _| {
            tracing::error!(dead_letter = %dead.id, reason = %dead.reason, "ALERT: dead letter needs attention");
            Ok(Plan::note(non_empty(note, "ops team alerted")))
        })
        .await
    }

    /// Tells the customer by SMS what the failed email would have said,
    /// and publishes `NOTIFICATION_SENT` (channel `sms`). The operator's
    /// `note` (may be empty) is added to the archive's.
    pub async fn sms(&self, id: &str, by: &str, note: &str) -> Result<ArchiveEntry, DlqError> {
        let events = self.events.clone();
        self.act(id, Action::Sms, by, |dead, now| {
            let req: NotificationRequest = serde_json::from_value(dead.original.payload.clone())
                .map_err(|_| {
                    DlqError::Invalid(format!(
                        "dead letter `{}` is not a notification request: nothing to send by SMS",
                        dead.id
                    ))
                })?;
            let email = crate::notification::compose(&req);
            let to = format!("phone-of-{}", req.customer_id);
            let event = NotificationEvent::NotificationSent {
                order_id: req.order_id.clone(),
                notification: req.kind,
                channel: "sms".into(),
                attempts: 1,
            };
            let env = Envelope::event(
                MessageId::new(format!("{}/sms", dead.id)),
                events,
                dead.original.saga_id.clone(),
                dead.original.saga.clone(),
                serde_json::to_value(&event).map_err(|e| {
                    DlqError::Invalid(format!("the SMS event does not encode: {e}"))
                })?,
                now,
            );
            Ok(Plan {
                note: with_note(format!("SMS to {to}"), note),
                new_message_id: None,
                publish: Some(env),
                sms: Some(Sms {
                    to,
                    text: email.body,
                }),
            })
        })
        .await
    }

    /// The fake SMS gateway.
    pub fn sms_gateway(&self) -> &FakeSms {
        &self.sms
    }
}

impl Plan {
    fn note(note: &str) -> Self {
        Self {
            note: note.to_owned(),
            new_message_id: None,
            publish: None,
            sms: None,
        }
    }
}

/// What an action did, then the operator's note if there is one.
fn with_note(done: String, note: &str) -> String {
    if note.trim().is_empty() {
        done
    } else {
        format!("{done}; {}", note.trim())
    }
}

fn non_empty<'a>(s: &'a str, default: &'a str) -> &'a str {
    if s.trim().is_empty() {
        default
    } else {
        s
    }
}
