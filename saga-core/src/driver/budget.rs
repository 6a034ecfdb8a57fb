//! What a runtime has registered: names used once, and steps that wait
//! long enough for their participants.

use std::sync::Mutex;
use std::time::Duration;

use crate::definition::{SagaData, SagaDefinition};
use crate::error::SagaError;
use crate::participant::ParticipantPolicy;

struct StepWait {
    saga: String,
    step: String,
    channel: String,
    timeout: Duration,
}

/// What a runtime has registered, checked as each registration comes:
///
/// - a name (saga type or participant) is registered once per runtime: two
///   workers of one saga type would hold diverging copies of its sagas,
///   and a saga and a participant of one name would share a consumer group
///   and a transactional id;
/// - every remote step's timeout covers the retry budget of the
///   participant on its channel, whichever is registered first: a step
///   that gives up on a command while the participant still works on it
///   would retry (or compensate) too early.
///
/// A runtime cannot check a participant that runs in another process; the
/// crate docs ("Who retries what") say how to size the two. Safe to share:
/// registrations may come from several tasks.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Registered>,
}

#[derive(Default)]
struct Registered {
    names: Vec<String>,
    steps: Vec<StepWait>,
    participants: Vec<(String, ParticipantPolicy)>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.lock();
        f.debug_struct("Registry")
            .field("names", &r.names)
            .field("steps", &r.steps.len())
            .field("participants", &r.participants.len())
            .finish()
    }
}

impl Registered {
    fn claim(&mut self, name: &str) -> Result<(), SagaError> {
        if self.names.iter().any(|n| n == name) {
            return Err(SagaError::AlreadyRegistered {
                name: name.to_owned(),
            });
        }
        Ok(())
    }
}

fn check(wait: &StepWait, policy: &ParticipantPolicy) -> Result<(), SagaError> {
    match policy.budget() {
        Some(budget) if budget > wait.timeout => Err(SagaError::RetryBudget {
            saga: wait.saga.clone(),
            step: wait.step.clone(),
            timeout: wait.timeout,
            participant: policy.name.clone(),
            budget,
            attempts: policy.retry.max_attempts,
        }),
        _ => Ok(()),
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registered> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers saga type `def`.
    ///
    /// # Errors
    /// [`SagaError::AlreadyRegistered`] if its name is taken;
    /// [`SagaError::RetryBudget`] if a step waits less than a registered
    /// participant on its channel may take. Nothing is registered then.
    pub fn add_saga<D: SagaData>(&self, def: &SagaDefinition<D>) -> Result<(), SagaError> {
        let mut waits = Vec::new();
        for step in def.steps() {
            let Some(timeout) = step.attempt_timeout() else {
                continue;
            };
            for channel in [step.channel(), step.compensation_channel()]
                .into_iter()
                .flatten()
            {
                waits.push(StepWait {
                    saga: def.name().to_owned(),
                    step: step.name().to_owned(),
                    channel: channel.to_owned(),
                    timeout,
                });
            }
        }
        let mut r = self.lock();
        r.claim(def.name())?;
        for wait in &waits {
            for (channel, policy) in &r.participants {
                if channel == &wait.channel {
                    check(wait, policy)?;
                }
            }
        }
        r.steps.extend(waits);
        r.names.push(def.name().to_owned());
        Ok(())
    }

    /// Registers participant `policy` on `channel`.
    ///
    /// # Errors
    /// [`SagaError::AlreadyRegistered`] if its name is taken;
    /// [`SagaError::RetryBudget`] if a registered step on `channel` waits
    /// less than `policy` may take. Nothing is registered then.
    pub fn add_participant(
        &self,
        channel: &str,
        policy: &ParticipantPolicy,
    ) -> Result<(), SagaError> {
        let mut r = self.lock();
        r.claim(&policy.name)?;
        for wait in r.steps.iter().filter(|w| w.channel == channel) {
            check(wait, policy)?;
        }
        r.participants.push((channel.to_owned(), policy.clone()));
        r.names.push(policy.name.clone());
        Ok(())
    }

    /// Forgets the saga type or participant `name` (its worker could not
    /// start), so it may be registered again.
    pub fn forget(&self, name: &str) {
        let mut r = self.lock();
        r.names.retain(|n| n != name);
        r.steps.retain(|w| w.saga != name);
        r.participants.retain(|(_, p)| p.name != name);
    }
}
