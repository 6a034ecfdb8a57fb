//! What a runtime reports about itself: the partitions or components it
//! cannot serve right now, and why.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::ids::Timestamp;

/// A runtime's health ([`Runtime::health`](crate::Runtime::health)): the
/// problems that stop part of it from working. Healthy when there are none.
///
/// A problem stays until what it reports is fixed (the partition restored,
/// the broker back): an operator, or a load balancer's health check, sees
/// every stalled partition instead of a worker silently not serving it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Health {
    /// What does not work, oldest first.
    pub problems: Vec<Problem>,
}

impl Health {
    /// Whether nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One part of a runtime that does not work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Problem {
    /// The component: a saga type's or participant's name, a projection's
    /// group, `"producer"`.
    pub component: String,
    /// The partition it concerns, if one.
    pub partition: Option<u32>,
    /// What is wrong, for humans.
    pub error: String,
    /// Since when.
    pub since: Timestamp,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.partition {
            Some(p) => write!(f, "{} (partition {p}): {}", self.component, self.error),
            None => write!(f, "{}: {}", self.component, self.error),
        }
    }
}

/// Where a runtime's workers report their problems and clear them (for
/// runtime authors); [`HealthBoard::health`] reads them all.
///
/// Cloning shares the board. Each problem also sets the gauge
/// `saga_runtime_problems` (labels `component`, `partition`) to 1 while it
/// lasts (feature `metrics`).
#[derive(Clone, Debug, Default)]
pub struct HealthBoard {
    problems: Arc<Mutex<Problems>>,
}

/// The problems by (component, partition).
type Problems = BTreeMap<(String, Option<u32>), Problem>;

impl HealthBoard {
    /// An empty board.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reports that `component` (on `partition`, if one) does not work
    /// because of `error`, from `now`. A second report of the same
    /// component and partition updates the error and keeps `since`.
    pub fn report(
        &self,
        component: &str,
        partition: Option<u32>,
        error: impl Into<String>,
        now: Timestamp,
    ) {
        let error = error.into();
        let mut problems = self.lock();
        let key = (component.to_owned(), partition);
        match problems.get_mut(&key) {
            Some(p) => p.error = error,
            None => {
                tracing::error!(component, ?partition, %error, "runtime problem");
                gauge(component, partition, 1.0);
                problems.insert(
                    key,
                    Problem {
                        component: component.to_owned(),
                        partition,
                        error,
                        since: now,
                    },
                );
            }
        }
    }

    /// `component` (on `partition`) works again.
    pub fn clear(&self, component: &str, partition: Option<u32>) {
        if let Some(p) = self.lock().remove(&(component.to_owned(), partition)) {
            tracing::info!(component, ?partition, was = %p.error, "runtime problem solved");
            gauge(component, partition, 0.0);
        }
    }

    /// Every problem of `component`, on any partition, is gone (it stopped
    /// or lost its partitions).
    pub fn clear_component(&self, component: &str) {
        let mut problems = self.lock();
        let gone: Vec<_> = problems
            .keys()
            .filter(|(c, _)| c == component)
            .cloned()
            .collect();
        for key in gone {
            problems.remove(&key);
            gauge(&key.0, key.1, 0.0);
        }
    }

    /// The problems now, oldest first.
    pub fn health(&self) -> Health {
        let mut problems: Vec<Problem> = self.lock().values().cloned().collect();
        problems.sort_by_key(|p| p.since);
        Health { problems }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Problems> {
        self.problems.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(feature = "metrics")]
fn gauge(component: &str, partition: Option<u32>, value: f64) {
    let partition = partition.map_or_else(String::new, |p| p.to_string());
    metrics::gauge!("saga_runtime_problems", "component" => component.to_owned(), "partition" => partition)
        .set(value);
}

#[cfg(not(feature = "metrics"))]
fn gauge(_: &str, _: Option<u32>, _: f64) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_lasts_until_cleared_and_keeps_its_start() {
        let board = HealthBoard::new();
        assert!(board.health().is_ok());
        board.report(
            "inventory",
            Some(2),
            "restore failed",
            Timestamp::from_millis(5),
        );
        board.report(
            "inventory",
            Some(2),
            "restore failed again",
            Timestamp::from_millis(9),
        );
        board.report("producer", None, "broker away", Timestamp::from_millis(7));
        let health = board.health();
        assert_eq!(health.problems.len(), 2);
        assert_eq!(health.problems[0].since, Timestamp::from_millis(5));
        assert_eq!(health.problems[0].error, "restore failed again");
        assert_eq!(
            health.problems[0].to_string(),
            "inventory (partition 2): restore failed again"
        );
        board.clear("inventory", Some(2));
        board.clear_component("producer");
        assert!(board.health().is_ok());
    }
}
