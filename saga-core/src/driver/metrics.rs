//! The metrics the drivers record (the table is in the `driver` module's
//! docs).
//!
//! Each driver keeps its metric handles: they are registered on first use
//! per saga (or participant) and step, not at every transition, which
//! would build the labels and look the metric up again each time. The
//! handles are registered again after a second, or at once if the
//! recorder in use changes (one installed later, a thread-local one in a
//! test), so an exporter that drops idle metrics gets them back.

#[cfg(feature = "metrics")]
mod on {
    use std::time::{Duration, Instant};

    use metrics::{Counter, Histogram, SharedString};

    use crate::driver::participant::AttemptResult;
    use crate::engine::{Effect, Transition};
    use crate::instance::{SagaStatus, TimerKind};

    /// How long a driver counts through its handles before it registers
    /// them again: an exporter that drops a metric left idle (an idle
    /// timeout) gets it back with its next count, as it did when every
    /// count registered its metric.
    const REFRESH: Duration = Duration::from_secs(1);

    /// An address that identifies the recorder in use.
    fn recorder_id() -> usize {
        metrics::with_recorder(|r| r as *const dyn metrics::Recorder as *const () as usize)
    }

    /// When and with which recorder the handles were registered.
    struct Registered {
        recorder: usize,
        at: Instant,
    }

    impl Registered {
        fn now() -> Self {
            Self {
                recorder: recorder_id(),
                at: Instant::now(),
            }
        }

        /// Whether the handles must be registered again: the recorder
        /// changed, or they are older than [`REFRESH`].
        fn stale(&self) -> bool {
            self.at.elapsed() >= REFRESH || self.recorder != recorder_id()
        }
    }

    /// One step's handles, each registered on first use.
    struct StepMetrics {
        step: String,
        latency: Option<Histogram>,
        retries: Option<Counter>,
    }

    /// A saga driver's metric handles (label `saga`), each registered on
    /// its first use (a series appears with its first count, as before).
    pub(crate) struct SagaMetrics {
        saga: SharedString,
        registered: Registered,
        started: Option<Counter>,
        completed: Option<Counter>,
        compensated: Option<Counter>,
        parked: Option<Counter>,
        completed_seconds: Option<Histogram>,
        compensated_seconds: Option<Histogram>,
        dead_letters: Option<Counter>,
        /// In order of first use: a saga has a few steps, so a scan
        /// comparing names beats hashing each one.
        steps: Vec<StepMetrics>,
    }

    /// Where `step`'s handles are in `steps`, added on first use.
    fn step_index(steps: &mut Vec<StepMetrics>, step: &str) -> usize {
        match steps.iter().position(|s| s.step == step) {
            Some(i) => i,
            None => {
                steps.push(StepMetrics {
                    step: step.to_owned(),
                    latency: None,
                    retries: None,
                });
                steps.len() - 1
            }
        }
    }

    /// A step metric's labels: built only when its handle is registered,
    /// not at every count.
    fn step_labels(saga: SharedString, step: &str) -> [(&'static str, SharedString); 2] {
        [
            ("saga", saga),
            ("step", SharedString::from(step.to_owned())),
        ]
    }

    impl SagaMetrics {
        pub(crate) fn new(saga: &str) -> Self {
            Self::named(SharedString::from(saga.to_owned()))
        }

        fn named(saga: SharedString) -> Self {
            Self {
                saga,
                registered: Registered::now(),
                started: None,
                completed: None,
                compensated: None,
                parked: None,
                completed_seconds: None,
                compensated_seconds: None,
                dead_letters: None,
                steps: Vec::new(),
            }
        }

        /// The handles, dropped to be registered again if stale.
        fn current(&mut self) -> &mut Self {
            if self.registered.stale() {
                *self = Self::named(self.saga.clone());
            }
            self
        }

        pub(crate) fn transition<D>(&mut self, before: Option<&SagaStatus>, t: &Transition<D>) {
            let m = self.current();
            let saga = &m.saga;
            let counter = |name: &'static str| metrics::counter!(name, "saga" => saga.clone());
            let duration = |status: &'static str| metrics::histogram!("saga_duration_seconds", "saga" => saga.clone(), "status" => status);
            if before.is_none() {
                m.started
                    .get_or_insert_with(|| counter("saga_started_total"))
                    .increment(1);
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
                        m.completed
                            .get_or_insert_with(|| counter("saga_completed_total"))
                            .increment(1);
                        m.completed_seconds
                            .get_or_insert_with(|| duration(SagaStatus::Completed.name()))
                            .record(secs());
                    }
                    SagaStatus::Compensated => {
                        m.compensated
                            .get_or_insert_with(|| counter("saga_compensated_total"))
                            .increment(1);
                        m.compensated_seconds
                            .get_or_insert_with(|| duration(SagaStatus::Compensated.name()))
                            .record(secs());
                    }
                    SagaStatus::Parked { .. } => m
                        .parked
                        .get_or_insert_with(|| counter("saga_parked_total"))
                        .increment(1),
                    _ => {}
                }
            }
            for effect in &t.effects {
                match effect {
                    Effect::ScheduleTimer(timer) => {
                        if let TimerKind::Backoff { step, .. } = timer.kind {
                            let step = t.instance.steps.get(step).map_or("", |s| &*s.name);
                            let i = step_index(&mut m.steps, step);
                            let saga = &m.saga;
                            m.steps[i]
                                .retries
                                .get_or_insert_with(|| {
                                    let labels = step_labels(saga.clone(), step);
                                    metrics::counter!("saga_retries_total", &labels)
                                })
                                .increment(1);
                        }
                    }
                    Effect::DeadLetter(d) if *d.source == *m.saga => {
                        let saga = &m.saga;
                        m.dead_letters
                            .get_or_insert_with(|| metrics::counter!("saga_dead_letters_total", "source" => saga.clone()))
                            .increment(1);
                    }
                    Effect::DeadLetter(d) => dead_letter(&d.source),
                    _ => {}
                }
            }
        }

        pub(crate) fn step_latency(&mut self, step: &str, secs: f64) {
            let m = self.current();
            let i = step_index(&mut m.steps, step);
            let saga = &m.saga;
            m.steps[i]
                .latency
                .get_or_insert_with(|| {
                    let labels = step_labels(saga.clone(), step);
                    metrics::histogram!("saga_step_latency_seconds", &labels)
                })
                .record(secs);
        }
    }

    /// A participant driver's metric handles (label `participant`), each
    /// registered on its first use.
    pub(crate) struct ParticipantMetrics {
        participant: SharedString,
        registered: Registered,
        replied: Option<Counter>,
        failed: Option<Counter>,
        seconds: Option<Histogram>,
    }

    impl ParticipantMetrics {
        pub(crate) fn new(participant: &str) -> Self {
            Self::named(SharedString::from(participant.to_owned()))
        }

        fn named(participant: SharedString) -> Self {
            Self {
                participant,
                registered: Registered::now(),
                replied: None,
                failed: None,
                seconds: None,
            }
        }

        fn current(&mut self) -> &mut Self {
            if self.registered.stale() {
                *self = Self::named(self.participant.clone());
            }
            self
        }

        pub(crate) fn attempt(&mut self, result: &AttemptResult, secs: f64) {
            let m = self.current();
            let participant = &m.participant;
            let attempts = |result: &'static str| metrics::counter!("participant_attempts_total", "participant" => participant.clone(), "result" => result);
            match result {
                AttemptResult::Replied { .. } => {
                    m.replied.get_or_insert_with(|| attempts("replied"))
                }
                AttemptResult::Failed { .. } => m.failed.get_or_insert_with(|| attempts("failed")),
            }
            .increment(1);
            m.seconds
                .get_or_insert_with(|| {
                    metrics::histogram!("participant_attempt_seconds", "participant" => participant.clone())
                })
                .record(secs);
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
