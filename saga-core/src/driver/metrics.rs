//! The metrics the drivers record (the table is in the `driver` module's
//! docs).

#[cfg(feature = "metrics")]
mod on {
    use crate::driver::participant::AttemptResult;
    use crate::engine::{Effect, Transition};
    use crate::instance::{SagaStatus, TimerKind};

    pub(crate) fn transition<D>(before: Option<&SagaStatus>, t: &Transition<D>) {
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
                Effect::DeadLetter(d) => dead_letter(&d.source),
                _ => {}
            }
        }
    }

    pub(crate) fn step_latency(saga: &str, step: &str, secs: f64) {
        metrics::histogram!("saga_step_latency_seconds", "saga" => saga.to_owned(), "step" => step.to_owned())
            .record(secs);
    }

    pub(crate) fn attempt(participant: &str, result: &AttemptResult, secs: f64) {
        let label = match result {
            AttemptResult::Replied { .. } => "replied",
            AttemptResult::Failed { .. } => "failed",
        };
        metrics::counter!("participant_attempts_total", "participant" => participant.to_owned(), "result" => label)
            .increment(1);
        metrics::histogram!("participant_attempt_seconds", "participant" => participant.to_owned())
            .record(secs);
    }

    pub(crate) fn dead_letter(source: &str) {
        metrics::counter!("saga_dead_letters_total", "source" => source.to_owned()).increment(1);
    }
}

#[cfg(not(feature = "metrics"))]
mod on {
    use crate::driver::participant::AttemptResult;
    use crate::engine::Transition;
    use crate::instance::SagaStatus;

    pub(crate) fn transition<D>(_: Option<&SagaStatus>, _: &Transition<D>) {}
    pub(crate) fn step_latency(_: &str, _: &str, _: f64) {}
    pub(crate) fn attempt(_: &str, _: &AttemptResult, _: f64) {}
    pub(crate) fn dead_letter(_: &str) {}
}

pub(crate) use on::{attempt, dead_letter, step_latency, transition};
