//! The metrics the drivers record (the table is in the `driver` module's
//! docs).
//!
//! Each driver keeps its metric handles: they are registered once per
//! saga (or participant) and step, not at every transition, which would
//! build the labels and look the metric up again each time. The handles
//! are registered again if the recorder in use changes (one installed
//! later, a thread-local one in a test).

#[cfg(feature = "metrics")]
mod on {
    use metrics::{Counter, Histogram, SharedString};

    use crate::driver::participant::AttemptResult;
    use crate::engine::{Effect, Transition};
    use crate::instance::{SagaStatus, TimerKind};

    /// An address that identifies the recorder in use.
    fn recorder_id() -> usize {
        metrics::with_recorder(|r| r as *const dyn metrics::Recorder as *const () as usize)
    }

    /// One step's handles.
    struct StepMetrics {
        step: String,
        latency: Histogram,
        retries: Counter,
    }

    /// A saga driver's metric handles (label `saga`).
    pub(crate) struct SagaMetrics {
        saga: SharedString,
        recorder: usize,
        started: Counter,
        completed: Counter,
        compensated: Counter,
        parked: Counter,
        completed_seconds: Histogram,
        compensated_seconds: Histogram,
        dead_letters: Counter,
        /// In order of first use: a saga has a few steps, so a scan
        /// comparing names beats hashing each one.
        steps: Vec<StepMetrics>,
    }

    impl SagaMetrics {
        pub(crate) fn new(saga: &str) -> Self {
            let saga = SharedString::from(saga.to_owned());
            let labels = [("saga", saga.clone())];
            let duration = |status: &'static str| metrics::histogram!("saga_duration_seconds", "saga" => saga.clone(), "status" => status);
            Self {
                recorder: recorder_id(),
                started: metrics::counter!("saga_started_total", &labels),
                completed: metrics::counter!("saga_completed_total", &labels),
                compensated: metrics::counter!("saga_compensated_total", &labels),
                parked: metrics::counter!("saga_parked_total", &labels),
                completed_seconds: duration(SagaStatus::Completed.name()),
                compensated_seconds: duration(SagaStatus::Compensated.name()),
                dead_letters: metrics::counter!("saga_dead_letters_total", "source" => saga.clone()),
                steps: Vec::new(),
                saga,
            }
        }

        /// The handles, registered again if the recorder changed.
        fn current(&mut self) -> &mut Self {
            if self.recorder != recorder_id() {
                *self = Self::new(&self.saga);
            }
            self
        }

        fn step(&mut self, step: &str) -> &StepMetrics {
            let i = match self.steps.iter().position(|s| s.step == step) {
                Some(i) => i,
                None => {
                    let labels = [
                        ("saga", self.saga.clone()),
                        ("step", SharedString::from(step.to_owned())),
                    ];
                    self.steps.push(StepMetrics {
                        step: step.to_owned(),
                        latency: metrics::histogram!("saga_step_latency_seconds", &labels),
                        retries: metrics::counter!("saga_retries_total", &labels),
                    });
                    self.steps.len() - 1
                }
            };
            &self.steps[i]
        }

        pub(crate) fn transition<D>(&mut self, before: Option<&SagaStatus>, t: &Transition<D>) {
            let m = self.current();
            if before.is_none() {
                m.started.increment(1);
            }
            let after = &t.instance.status;
            if before != Some(after) {
                let secs = || {
                    t.instance
                        .updated_at
                        .saturating_since(t.instance.created_at)
                        .as_secs_f64()
                };
                match after {
                    SagaStatus::Completed => {
                        m.completed.increment(1);
                        m.completed_seconds.record(secs());
                    }
                    SagaStatus::Compensated => {
                        m.compensated.increment(1);
                        m.compensated_seconds.record(secs());
                    }
                    SagaStatus::Parked { .. } => m.parked.increment(1),
                    _ => {}
                }
            }
            for effect in &t.effects {
                match effect {
                    Effect::ScheduleTimer(timer) => {
                        if let TimerKind::Backoff { step, .. } = timer.kind {
                            let step = t.instance.steps.get(step).map_or("", |s| &*s.name);
                            m.step(step).retries.increment(1);
                        }
                    }
                    Effect::DeadLetter(d) if *d.source == *m.saga => m.dead_letters.increment(1),
                    Effect::DeadLetter(d) => dead_letter(&d.source),
                    _ => {}
                }
            }
        }

        pub(crate) fn step_latency(&mut self, step: &str, secs: f64) {
            self.current().step(step).latency.record(secs);
        }
    }

    /// A participant driver's metric handles (label `participant`).
    pub(crate) struct ParticipantMetrics {
        participant: SharedString,
        recorder: usize,
        replied: Counter,
        failed: Counter,
        seconds: Histogram,
    }

    impl ParticipantMetrics {
        pub(crate) fn new(participant: &str) -> Self {
            let participant = SharedString::from(participant.to_owned());
            let attempts = |result: &'static str| metrics::counter!("participant_attempts_total", "participant" => participant.clone(), "result" => result);
            Self {
                recorder: recorder_id(),
                replied: attempts("replied"),
                failed: attempts("failed"),
                seconds: metrics::histogram!("participant_attempt_seconds", "participant" => participant.clone()),
                participant,
            }
        }

        fn current(&mut self) -> &mut Self {
            if self.recorder != recorder_id() {
                *self = Self::new(&self.participant);
            }
            self
        }

        pub(crate) fn attempt(&mut self, result: &AttemptResult, secs: f64) {
            let m = self.current();
            match result {
                AttemptResult::Replied { .. } => m.replied.increment(1),
                AttemptResult::Failed { .. } => m.failed.increment(1),
            }
            m.seconds.record(secs);
        }
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

    pub(crate) struct SagaMetrics;

    impl SagaMetrics {
        pub(crate) fn new(_: &str) -> Self {
            Self
        }
        pub(crate) fn transition<D>(&mut self, _: Option<&SagaStatus>, _: &Transition<D>) {}
        pub(crate) fn step_latency(&mut self, _: &str, _: f64) {}
    }

    pub(crate) struct ParticipantMetrics;

    impl ParticipantMetrics {
        pub(crate) fn new(_: &str) -> Self {
            Self
        }
        pub(crate) fn attempt(&mut self, _: &AttemptResult, _: f64) {}
    }

    pub(crate) fn dead_letter(_: &str) {}
}

pub(crate) use on::{dead_letter, ParticipantMetrics, SagaMetrics};
