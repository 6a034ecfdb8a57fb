//! Metrics (through the `metrics` facade: install any exporter, e.g.
//! Prometheus, to collect them) recorded by the runtimes.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `saga_started_total` | counter | `saga` |
//! | `saga_completed_total` | counter | `saga` |
//! | `saga_compensated_total` | counter | `saga` |
//! | `saga_parked_total` | counter | `saga` |
//! | `saga_retries_total` | counter | `saga`, `step` |
//! | `saga_dead_letters_total` | counter | `source` |
//! | `saga_duration_seconds` | histogram | `saga`, `status` |
//! | `saga_step_latency_seconds` | histogram | `saga`, `step` |
//! | `participant_attempts_total` | counter | `participant`, `result` |
//! | `participant_attempt_seconds` | histogram | `participant` |

use crate::engine::{Effect, Transition};
use crate::instance::{SagaStatus, TimerKind};
use crate::participant::AttemptResult;

/// Records the metrics of one saga transition. `before` is the status
/// before it (`None` for a start).
pub fn record_transition<D>(before: Option<&SagaStatus>, t: &Transition<D>) {
    let saga = t.instance.saga.clone();
    if before.is_none() {
        metrics::counter!("saga_started_total", "saga" => saga.clone()).increment(1);
    }
    let after = &t.instance.status;
    if before != Some(after) {
        let name = match after {
            SagaStatus::Completed => Some("saga_completed_total"),
            SagaStatus::Compensated => Some("saga_compensated_total"),
            SagaStatus::Parked { .. } => Some("saga_parked_total"),
            _ => None,
        };
        if let Some(name) = name {
            metrics::counter!(name, "saga" => saga.clone()).increment(1);
        }
        if after.is_final() {
            let secs = t
                .instance
                .updated_at
                .saturating_since(t.instance.created_at)
                .as_secs_f64();
            metrics::histogram!("saga_duration_seconds", "saga" => saga.clone(), "status" => after.name())
                .record(secs);
        }
    }
    for effect in &t.effects {
        match effect {
            Effect::ScheduleTimer(timer) => {
                if let TimerKind::Backoff { step, .. } = timer.kind {
                    let step = t
                        .instance
                        .steps
                        .get(step)
                        .map(|s| s.name.clone())
                        .unwrap_or_default();
                    metrics::counter!("saga_retries_total", "saga" => saga.clone(), "step" => step)
                        .increment(1);
                }
            }
            Effect::DeadLetter(d) => {
                metrics::counter!("saga_dead_letters_total", "source" => d.source.clone())
                    .increment(1);
            }
            _ => {}
        }
    }
}

/// Records the latency of a step, from its command to its reply.
pub fn record_step_latency(saga: &str, step: &str, secs: f64) {
    metrics::histogram!("saga_step_latency_seconds", "saga" => saga.to_owned(), "step" => step.to_owned())
        .record(secs);
}

/// Records one participant attempt and how long it took.
pub fn record_attempt(participant: &str, result: &AttemptResult, secs: f64) {
    let label = match result {
        AttemptResult::Replied { .. } => "replied",
        AttemptResult::Failed { .. } => "failed",
    };
    metrics::counter!("participant_attempts_total", "participant" => participant.to_owned(), "result" => label)
        .increment(1);
    metrics::histogram!("participant_attempt_seconds", "participant" => participant.to_owned())
        .record(secs);
}

/// Records dead letters written by a participant.
pub fn record_dead_letters(effects: &[Effect]) {
    for effect in effects {
        if let Effect::DeadLetter(d) = effect {
            metrics::counter!("saga_dead_letters_total", "source" => d.source.clone()).increment(1);
        }
    }
}
