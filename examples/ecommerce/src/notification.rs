//! The notification service: a saga participant on `notifications.requests`
//! that emails customers through an [`EmailProvider`].
//!
//! The runtime gives it the seed's policy (see [`policy`]): 5 s per attempt,
//! 3 attempts, 2 s then 4 s between them, then the request goes to
//! `notifications.dlq` with the DLQ metadata. It publishes
//! `NOTIFICATION_SENT`, or `NOTIFICATION_FAILED` from
//! [`Participant::on_dead_letter`], and answers the saga either way: a lost
//! email never cancels a confirmed order.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use saga_core::{
    Classify, Clock, DeadLetter, ErrorClass, Participant, ParticipantContext, ParticipantPolicy,
    RetryPolicy, Timestamp,
};
use serde::Serialize;

use crate::messages::{
    NotificationEvent, NotificationReply, NotificationRequest, Topics, NOTIFICATIONS_DLQ,
    NOTIFICATIONS_EVENTS,
};

/// An email to send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Email {
    /// The recipient.
    pub to: String,
    /// The subject line.
    pub subject: String,
    /// The text.
    pub body: String,
}

/// Why an email provider did not take an email.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EmailError {
    /// The provider answered with an HTTP status (503, 500, 400 …).
    Status(u16, String),
}

impl fmt::Display for EmailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmailError::Status(code, text) => write!(f, "{code} {text}"),
        }
    }
}

impl Classify for EmailError {
    fn class(&self) -> ErrorClass {
        match self {
            EmailError::Status(code, _) if *code >= 500 || *code == 429 => ErrorClass::Retryable,
            _ => ErrorClass::Permanent,
        }
    }
}

/// An external email API. (A hung call is cut by the participant's timeout.)
#[async_trait]
pub trait EmailProvider: Send + Sync + 'static {
    /// Sends `email`.
    async fn send(&self, email: &Email) -> Result<(), EmailError>;
}

/// What the fake provider does with one send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeOutcome {
    /// Delivers it.
    Ok,
    /// Never answers (the caller's timeout fires).
    Timeout,
    /// Answers with this HTTP status.
    Status(u16),
}

impl std::str::FromStr for FakeOutcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ok" => Ok(FakeOutcome::Ok),
            "timeout" => Ok(FakeOutcome::Timeout),
            other => other
                .parse::<u16>()
                .ok()
                .filter(|c| (400..600).contains(c))
                .map(FakeOutcome::Status)
                .ok_or_else(|| format!("`{s}` is not ok, timeout or an HTTP error status")),
        }
    }
}

/// Parses a script like `"timeout, 503, 500"`.
pub fn parse_script(script: &str) -> Result<Vec<FakeOutcome>, String> {
    script
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(str::parse)
        .collect()
}

#[derive(Default)]
struct FakeState {
    /// Outcomes for the next sends, whoever they are for.
    script: VecDeque<FakeOutcome>,
    /// Outcomes for the next sends to one recipient.
    per_recipient: HashMap<String, VecDeque<FakeOutcome>>,
    /// Share of sends (0.0–1.0) that fail with 503 when no script applies.
    failure_rate: f64,
    /// Seeded pseudo-random state for `failure_rate`.
    rng: u64,
    sent: Vec<Email>,
}

/// The bundled fake email API: delivers unless told otherwise, by script
/// ("timeout, 503, 500" for the next three sends, or for one recipient) or
/// by a failure rate. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct FakeEmailProvider {
    state: Arc<Mutex<FakeState>>,
}

impl FakeEmailProvider {
    /// A provider that delivers everything.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next sends (whoever they are for) turn out as `outcomes`.
    pub fn script(&self, outcomes: impl IntoIterator<Item = FakeOutcome>) {
        self.lock().script.extend(outcomes);
    }

    /// The next sends to `recipient` turn out as `outcomes`.
    pub fn script_for(&self, recipient: &str, outcomes: impl IntoIterator<Item = FakeOutcome>) {
        self.lock()
            .per_recipient
            .entry(recipient.to_owned())
            .or_default()
            .extend(outcomes);
    }

    /// A share (0.0–1.0) of unscripted sends fails with 503, drawn from a
    /// seeded generator (the same seed gives the same failures).
    pub fn fail_randomly(&self, rate: f64, seed: u64) {
        let mut st = self.lock();
        st.failure_rate = rate.clamp(0.0, 1.0);
        st.rng = seed | 1;
    }

    /// Every email delivered so far.
    pub fn sent(&self) -> Vec<Email> {
        self.lock().sent.clone()
    }

    fn next_outcome(&self, to: &str) -> FakeOutcome {
        let mut st = self.lock();
        if let Some(o) = st.per_recipient.get_mut(to).and_then(VecDeque::pop_front) {
            return o;
        }
        if let Some(o) = st.script.pop_front() {
            return o;
        }
        if st.failure_rate > 0.0 {
            // xorshift64: deterministic, no dependency.
            st.rng ^= st.rng << 13;
            st.rng ^= st.rng >> 7;
            st.rng ^= st.rng << 17;
            let draw = (st.rng % 10_000) as f64 / 10_000.0;
            if draw < st.failure_rate {
                return FakeOutcome::Status(503);
            }
        }
        FakeOutcome::Ok
    }
}

#[async_trait]
impl EmailProvider for FakeEmailProvider {
    async fn send(&self, email: &Email) -> Result<(), EmailError> {
        match self.next_outcome(&email.to) {
            FakeOutcome::Ok => {
                crate::system::keep_recent(&mut self.lock().sent, email.clone());
                Ok(())
            }
            FakeOutcome::Timeout => {
                // Hang far longer than any sane timeout.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err(EmailError::Status(504, "Gateway Timeout".into()))
            }
            FakeOutcome::Status(code) => Err(EmailError::Status(
                code,
                match code {
                    500 => "Internal Server Error",
                    502 => "Bad Gateway",
                    503 => "Service Unavailable",
                    429 => "Too Many Requests",
                    400 => "Bad Request",
                    _ => "Error",
                }
                .into(),
            )),
        }
    }
}

/// The notification policy's numbers (the seed's by default).
#[derive(Clone, Debug)]
pub struct NotificationPolicy {
    /// Deadline of one attempt (seed: 5 s).
    pub attempt_timeout: Duration,
    /// Wait after the first failure; doubles after each (seed: 2 s, then 4 s).
    pub first_backoff: Duration,
    /// Attempts in all (seed: 3).
    pub max_attempts: u32,
}

impl Default for NotificationPolicy {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(5),
            first_backoff: Duration::from_secs(2),
            max_attempts: 3,
        }
    }
}

/// The runtime policy of the notification participant (its name, the
/// consumer group, and its dead-letter channel under `topics`).
pub fn policy(p: &NotificationPolicy, topics: &Topics) -> ParticipantPolicy {
    // A new attempt of a step whose email went out (a late reply made the
    // saga retry, an operator retried) gets the first answer from the
    // runtime: the email is not sent twice.
    ParticipantPolicy::new(topics.name("notification"))
        .remember_steps()
        .retry(RetryPolicy::exponential(p.first_backoff, 2.0).with_max_attempts(p.max_attempts))
        .timeout(p.attempt_timeout)
        .dead_letter_channel(topics.name(NOTIFICATIONS_DLQ))
}

/// One attempt at sending one notification, for timelines and the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttemptRecord {
    /// The order.
    pub order_id: String,
    /// `ORDER_CONFIRMED` or `ORDER_CANCELLED`.
    pub notification: String,
    /// The request's message id.
    pub message_id: String,
    /// 1-based.
    pub attempt: u32,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended.
    pub ended_at: Timestamp,
    /// "sent", the provider's error, or "no answer (timed out)".
    pub outcome: String,
}

/// Records an attempt when dropped: the participant's timeout cancels a
/// hung attempt, and the drop is then the only place to see it end.
struct AttemptGuard {
    log: Arc<Mutex<Vec<AttemptRecord>>>,
    clock: Clock,
    record: Option<AttemptRecord>,
}

impl AttemptGuard {
    fn finish(&mut self, outcome: String) {
        if let Some(mut r) = self.record.take() {
            r.ended_at = self.clock.now();
            r.outcome = outcome;
            crate::system::keep_recent(&mut self.log.lock().unwrap_or_else(|e| e.into_inner()), r);
        }
    }
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        self.finish("no answer (timed out)".into());
    }
}

/// The notification participant.
#[derive(Clone)]
pub struct NotificationService {
    provider: Arc<dyn EmailProvider>,
    clock: Clock,
    attempts: Arc<Mutex<Vec<AttemptRecord>>>,
    events: String,
}

impl NotificationService {
    /// A service sending through `provider`, timing attempts with `clock`.
    pub fn new(provider: Arc<dyn EmailProvider>, clock: Clock) -> Self {
        Self {
            provider,
            clock,
            attempts: Arc::default(),
            events: NOTIFICATIONS_EVENTS.into(),
        }
    }

    /// Publishes its events on `channel` instead of `notifications.events`.
    pub fn events_on(mut self, channel: impl Into<String>) -> Self {
        self.events = channel.into();
        self
    }

    /// Every attempt so far, in the order they ended.
    pub fn attempts(&self) -> Vec<AttemptRecord> {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The attempts for one order.
    pub fn attempts_for(&self, order_id: &str) -> Vec<AttemptRecord> {
        let mut v: Vec<_> = self
            .attempts()
            .into_iter()
            .filter(|a| a.order_id == order_id)
            .collect();
        v.sort_by_key(|a| a.started_at);
        v
    }
}

/// The email for a request.
pub fn compose(req: &NotificationRequest) -> Email {
    use crate::messages::NotificationKind::*;
    let (subject, body) = match req.kind {
        OrderConfirmed => (
            format!("Order {} confirmed", req.order_id),
            format!(
                "Thank you! Your order {} is confirmed. Total: {}.",
                req.order_id, req.total
            ),
        ),
        OrderCancelled => (
            format!("Order {} cancelled", req.order_id),
            format!(
                "Sorry, your order {} was cancelled: {}.",
                req.order_id,
                req.reason.as_deref().unwrap_or("no reason given")
            ),
        ),
    };
    Email {
        to: req.email.clone(),
        subject,
        body,
    }
}

#[async_trait]
impl Participant for NotificationService {
    type Command = NotificationRequest;
    type Reply = NotificationReply;
    type Error = EmailError;

    async fn handle(
        &self,
        req: NotificationRequest,
        ctx: &mut ParticipantContext,
    ) -> Result<NotificationReply, EmailError> {
        let email = compose(&req);
        let mut guard = AttemptGuard {
            log: self.attempts.clone(),
            clock: self.clock,
            record: Some(AttemptRecord {
                order_id: req.order_id.clone(),
                notification: req.kind.as_str().to_owned(),
                message_id: ctx.message_id().to_string(),
                attempt: ctx.attempt(),
                started_at: ctx.now(),
                ended_at: ctx.now(),
                outcome: String::new(),
            }),
        };
        // One span per attempt at the email API, in the order's trace: a
        // log search for the trace id finds every attempt.
        let span = tracing::info_span!(
            "notification.send",
            order_id = %req.order_id,
            attempt = ctx.attempt(),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
        );
        if let Some(parent) = ctx.trace() {
            saga_core::trace::link_span(&span, Some(&parent));
        }
        let result = tracing::Instrument::instrument(self.provider.send(&email), span).await;
        guard.finish(match &result {
            Ok(()) => "sent".into(),
            Err(e) => e.to_string(),
        });
        result?;
        tracing::info!(order_id = %req.order_id, to = %email.to, attempt = ctx.attempt(), "email sent");
        ctx.emit(
            self.events.clone(),
            &NotificationEvent::NotificationSent {
                order_id: req.order_id,
                notification: req.kind,
                channel: "email".into(),
                attempts: ctx.attempt(),
            },
        );
        Ok(NotificationReply::Sent {
            attempts: ctx.attempt(),
        })
    }

    /// A fire-and-forget request (the cancellation email) that failed
    /// every attempt: `NOTIFICATION_FAILED` goes out with the dead letter.
    /// (The confirmation email's failure is the order saga's to record: its
    /// step gives up and dead-letters it, see `order.rs`.)
    fn on_dead_letter(&self, dead: &DeadLetter, ctx: &mut ParticipantContext) {
        tracing::warn!(message_id = %dead.original.id, reason = %dead.reason, last_error = %dead.last_error, "notification dead-lettered");
        if let Ok(req) =
            serde_json::from_value::<NotificationRequest>(dead.original.payload.clone())
        {
            ctx.emit(
                self.events.clone(),
                &NotificationEvent::NotificationFailed {
                    order_id: req.order_id,
                    notification: req.kind,
                    retry_count: dead.retry_count,
                    reason: dead.reason.clone(),
                    last_error: dead.last_error.clone(),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scripts_and_classifies_errors() {
        assert_eq!(
            parse_script("timeout, 503, 500").unwrap(),
            vec![
                FakeOutcome::Timeout,
                FakeOutcome::Status(503),
                FakeOutcome::Status(500)
            ]
        );
        assert!(parse_script("timeout, 200").is_err());
        assert_eq!(
            EmailError::Status(503, "x".into()).class(),
            ErrorClass::Retryable
        );
        assert_eq!(
            EmailError::Status(400, "x".into()).class(),
            ErrorClass::Permanent
        );
    }
}
