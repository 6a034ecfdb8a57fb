//! Retry policies as data: "after which delay, or give up".
//!
//! A [`RetryPolicy`] never sleeps. It answers, for an attempt that just
//! failed, whether to try again and after how long. The engine turns that
//! answer into a persisted timer, so a wait survives a crash and never blocks
//! other sagas.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::SagaError;

/// Whether an error may go away if the same operation is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Transient (a timeout, an unavailable service): try again.
    Retryable,
    /// Will fail the same way every time (bad input, a business rule): do not retry.
    Permanent,
}

/// Classifies a user's error type into retryable or permanent.
///
/// Implement it for the error type of your [`Participant`](crate::Participant)
/// so the runtime knows which failures to retry.
///
/// ```
/// use saga_core::{Classify, ErrorClass};
///
/// #[derive(Debug)]
/// enum EmailError { Timeout, Unavailable, InvalidAddress }
///
/// impl Classify for EmailError {
///     fn class(&self) -> ErrorClass {
///         match self {
///             EmailError::Timeout | EmailError::Unavailable => ErrorClass::Retryable,
///             EmailError::InvalidAddress => ErrorClass::Permanent,
///         }
///     }
/// }
/// assert_eq!(EmailError::Timeout.class(), ErrorClass::Retryable);
/// ```
pub trait Classify {
    /// The class of this error.
    fn class(&self) -> ErrorClass;
}

impl Classify for ErrorClass {
    fn class(&self) -> ErrorClass {
        *self
    }
}

/// How the delay between attempts is randomised.
///
/// Randomness is seeded (the engine derives the seed from the saga id, step
/// and attempt), so the same inputs always give the same delay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// The computed delay exactly.
    #[default]
    None,
    /// Uniform in `[0, delay]`.
    Full,
    /// Uniform in `[delay / 2, delay]`.
    Equal,
}

/// The answer of a [`RetryPolicy`] for a failed attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Stop trying, for this reason.
    GiveUp(GiveUpReason),
}

/// Why a [`RetryPolicy`] gave up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GiveUpReason {
    /// The error is permanent: retrying cannot help.
    PermanentError,
    /// `max_attempts` attempts were made.
    MaxAttempts(u32),
    /// The next attempt would start after `max_elapsed` since the first.
    MaxElapsed(Duration),
}

impl fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GiveUpReason::PermanentError => f.write_str("permanent error"),
            GiveUpReason::MaxAttempts(n) => write!(f, "max retries reached ({n} attempts)"),
            GiveUpReason::MaxElapsed(d) => write!(f, "max elapsed time reached ({d:?})"),
        }
    }
}

/// Exponential backoff with a cap, attempt and time limits, and jitter.
///
/// The delay before attempt `n + 1` (after `n` failed attempts) is
/// `min(initial_interval * multiplier^(n-1), max_interval)`, then jittered.
///
/// ```
/// use std::time::Duration;
/// use saga_core::{RetryPolicy, RetryDecision, ErrorClass};
///
/// // The seed's notification policy: 3 attempts, waiting 2 s then 4 s.
/// let policy = RetryPolicy::exponential(Duration::from_secs(2), 2.0)
///     .with_max_attempts(3);
/// let d1 = policy.decide(ErrorClass::Retryable, 1, Duration::ZERO, 7);
/// let d2 = policy.decide(ErrorClass::Retryable, 2, Duration::from_secs(2), 7);
/// assert_eq!(d1, RetryDecision::RetryAfter(Duration::from_secs(2)));
/// assert_eq!(d2, RetryDecision::RetryAfter(Duration::from_secs(4)));
/// assert!(matches!(policy.decide(ErrorClass::Retryable, 3, Duration::from_secs(6), 7),
///                  RetryDecision::GiveUp(_)));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// The delay after the first failed attempt.
    pub initial_interval: Duration,
    /// Growth factor of the delay per attempt (at least 1.0).
    pub multiplier: f64,
    /// The largest delay between two attempts.
    pub max_interval: Duration,
    /// Total attempts including the first (at least 1; 1 means no retry).
    pub max_attempts: u32,
    /// No attempt starts later than this after the first one (`None`: no limit).
    pub max_elapsed: Option<Duration>,
    /// How delays are randomised.
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    /// 3 attempts, 100 ms then 200 ms, capped at 30 s, no jitter.
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_millis(100),
            multiplier: 2.0,
            max_interval: Duration::from_secs(30),
            max_attempts: 3,
            max_elapsed: None,
            jitter: Jitter::None,
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries: one attempt.
    pub fn no_retry() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Exponential backoff from `initial_interval`, growing by `multiplier`.
    pub fn exponential(initial_interval: Duration, multiplier: f64) -> Self {
        Self {
            initial_interval,
            multiplier,
            max_interval: Duration::from_secs(300).max(initial_interval),
            ..Self::default()
        }
    }

    /// A constant delay between attempts.
    pub fn fixed(interval: Duration) -> Self {
        Self::exponential(interval, 1.0)
    }

    /// Sets the total number of attempts (including the first).
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Sets the cap on a single delay.
    pub fn with_max_interval(mut self, d: Duration) -> Self {
        self.max_interval = d;
        self
    }

    /// Sets the limit on the time from the first attempt to the start of the last.
    pub fn with_max_elapsed(mut self, d: Duration) -> Self {
        self.max_elapsed = Some(d);
        self
    }

    /// Sets the jitter.
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Checks the policy's fields, naming the bad one.
    ///
    /// # Errors
    /// [`SagaError::InvalidPolicy`] for no attempts, a multiplier below 1 or
    /// not finite, or a cap below the initial interval.
    pub fn validate(&self) -> Result<(), SagaError> {
        let bad = |reason: &str| {
            Err(SagaError::InvalidPolicy {
                reason: reason.to_owned(),
            })
        };
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1");
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return bad("multiplier must be a finite number >= 1.0");
        }
        if self.max_interval < self.initial_interval {
            return bad("max_interval must be >= initial_interval");
        }
        Ok(())
    }

    /// The un-jittered delay after `failed_attempts` failed attempts (≥ 1).
    pub fn base_delay(&self, failed_attempts: u32) -> Duration {
        let exp = failed_attempts.saturating_sub(1).min(1_000) as i32;
        let secs = self.initial_interval.as_secs_f64() * self.multiplier.powi(exp);
        let cap = self.max_interval.as_secs_f64();
        if !secs.is_finite() || secs >= cap {
            self.max_interval
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay after `failed_attempts` failed attempts, jittered with `seed`.
    pub fn delay(&self, failed_attempts: u32, seed: u64) -> Duration {
        let base = self.base_delay(failed_attempts);
        let ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
        let draw = splitmix64(seed ^ u64::from(failed_attempts));
        // `draw % (n + 1)` is uniform enough for delays (n is far below 2^64).
        let uniform = |n: u64| draw % n.saturating_add(1);
        let jittered = match self.jitter {
            Jitter::None => ms,
            Jitter::Full => uniform(ms),
            Jitter::Equal => ms / 2 + uniform(ms - ms / 2),
        };
        Duration::from_millis(jittered)
    }

    /// Decides what to do after attempt number `attempt` (1-based) failed with
    /// an error of class `class`, `elapsed` after the first attempt started.
    pub fn decide(
        &self,
        class: impl Classify,
        attempt: u32,
        elapsed: Duration,
        seed: u64,
    ) -> RetryDecision {
        if class.class() == ErrorClass::Permanent {
            return RetryDecision::GiveUp(GiveUpReason::PermanentError);
        }
        if attempt >= self.max_attempts {
            return RetryDecision::GiveUp(GiveUpReason::MaxAttempts(attempt));
        }
        let delay = self.delay(attempt, seed);
        if let Some(limit) = self.max_elapsed {
            if elapsed.saturating_add(delay) > limit {
                return RetryDecision::GiveUp(GiveUpReason::MaxElapsed(limit));
            }
        }
        RetryDecision::RetryAfter(delay)
    }
}

/// One step of the SplitMix64 generator: a well-mixed 64-bit value from a
/// seed, so jitter is random-looking yet the same for the same inputs.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
