//! One test per retry-policy field, on the pure policy and through the
//! engine on the harness's virtual clock (nothing sleeps).

use std::time::Duration;

use proptest::prelude::*;
use saga_core::driver::TimerKind;
use saga_core::testing::SagaHarness;
use saga_core::*;

const RETRY: ErrorClass = ErrorClass::Retryable;

fn delays(policy: &RetryPolicy, seed: u64) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut elapsed = Duration::ZERO;
    for attempt in 1.. {
        match policy.decide(RETRY, attempt, elapsed, seed) {
            RetryDecision::RetryAfter(d) => {
                elapsed += d;
                out.push(d);
            }
            RetryDecision::GiveUp(_) => break,
        }
    }
    out
}

fn ms(v: &[u64]) -> Vec<Duration> {
    v.iter().map(|m| Duration::from_millis(*m)).collect()
}

#[test]
fn initial_interval_is_the_first_delay() {
    let p = RetryPolicy::exponential(Duration::from_millis(250), 2.0).with_max_attempts(2);
    assert_eq!(delays(&p, 0), ms(&[250]));
}

#[test]
fn multiplier_grows_each_delay() {
    let p = RetryPolicy::exponential(Duration::from_millis(100), 3.0).with_max_attempts(4);
    assert_eq!(delays(&p, 0), ms(&[100, 300, 900]));
    let fixed = RetryPolicy::fixed(Duration::from_millis(100)).with_max_attempts(4);
    assert_eq!(delays(&fixed, 0), ms(&[100, 100, 100]));
}

#[test]
fn max_interval_caps_every_delay() {
    let p = RetryPolicy::exponential(Duration::from_millis(100), 10.0)
        .with_max_interval(Duration::from_millis(2_000))
        .with_max_attempts(5);
    assert_eq!(delays(&p, 0), ms(&[100, 1_000, 2_000, 2_000]));
}

#[test]
fn max_attempts_counts_the_first_attempt() {
    let p = RetryPolicy::exponential(Duration::from_secs(2), 2.0).with_max_attempts(3);
    assert_eq!(delays(&p, 0), ms(&[2_000, 4_000]));
    assert_eq!(
        p.decide(RETRY, 3, Duration::ZERO, 0),
        RetryDecision::GiveUp(GiveUpReason::MaxAttempts(3))
    );
    assert!(delays(&RetryPolicy::no_retry(), 0).is_empty());
}

#[test]
fn max_elapsed_stops_a_retry_that_would_start_too_late() {
    let p = RetryPolicy::exponential(Duration::from_secs(1), 2.0)
        .with_max_attempts(100)
        .with_max_elapsed(Duration::from_secs(10));
    // 1 + 2 + 4 = 7 s; the next (8 s) would start at 15 s > 10 s.
    assert_eq!(delays(&p, 0), ms(&[1_000, 2_000, 4_000]));
    assert_eq!(
        p.decide(RETRY, 4, Duration::from_secs(7), 0),
        RetryDecision::GiveUp(GiveUpReason::MaxElapsed(Duration::from_secs(10)))
    );
}

#[test]
fn permanent_errors_are_never_retried() {
    let p = RetryPolicy::default().with_max_attempts(10);
    assert_eq!(
        p.decide(ErrorClass::Permanent, 1, Duration::ZERO, 0),
        RetryDecision::GiveUp(GiveUpReason::PermanentError)
    );
    assert_eq!(
        p.decide(StepError::permanent("no"), 1, Duration::ZERO, 0),
        RetryDecision::GiveUp(GiveUpReason::PermanentError)
    );
    assert!(matches!(
        p.decide(StepError::retryable("busy"), 1, Duration::ZERO, 0),
        RetryDecision::RetryAfter(_)
    ));
}

#[test]
fn jitter_none_is_exact_and_seeded_jitter_is_reproducible() {
    let base = RetryPolicy::exponential(Duration::from_millis(1_000), 2.0).with_max_attempts(4);
    assert_eq!(delays(&base, 1), delays(&base, 2));
    let full = base.clone().with_jitter(Jitter::Full);
    assert_eq!(
        delays(&full, 42),
        delays(&full, 42),
        "same seed, same delays"
    );
    let spread: std::collections::HashSet<_> = (0..50).map(|s| full.delay(1, s)).collect();
    assert!(
        spread.len() > 10,
        "full jitter should spread delays, got {spread:?}"
    );
}

proptest! {
    #[test]
    fn full_jitter_stays_within_zero_and_the_delay(seed in any::<u64>(), attempt in 1u32..8) {
        let p = RetryPolicy::exponential(Duration::from_millis(100), 2.0).with_jitter(Jitter::Full);
        let d = p.delay(attempt, seed);
        prop_assert!(d <= p.base_delay(attempt));
    }

    #[test]
    fn equal_jitter_stays_within_half_and_the_delay(seed in any::<u64>(), attempt in 1u32..8) {
        let p = RetryPolicy::exponential(Duration::from_millis(100), 2.0).with_jitter(Jitter::Equal);
        let d = p.delay(attempt, seed);
        let base = p.base_delay(attempt);
        prop_assert!(d <= base && d >= base / 2, "{d:?} not in [{:?}, {base:?}]", base / 2);
    }
}

#[test]
fn invalid_policies_are_rejected_with_the_field_named() {
    let cases = [
        (RetryPolicy::default().with_max_attempts(0), "max_attempts"),
        (
            RetryPolicy::exponential(Duration::from_secs(1), 0.5),
            "multiplier",
        ),
        (
            RetryPolicy::exponential(Duration::from_secs(1), f64::NAN),
            "multiplier",
        ),
        (
            RetryPolicy::exponential(Duration::from_secs(10), 2.0)
                .with_max_interval(Duration::from_secs(1)),
            "max_interval",
        ),
    ];
    for (policy, field) in cases {
        let err = policy.validate().unwrap_err();
        assert!(err.to_string().contains(field), "{err} should name {field}");
        // And a definition using it does not build.
        let built = SagaDefinition::<()>::builder("s")
            .step(Step::<()>::local("a", |_| Ok(())).retry(policy))
            .build();
        assert!(matches!(built, Err(SagaError::InvalidPolicy { .. })));
    }
}

// Through the engine: the backoff timers land exactly where the policy says.

fn flaky_saga(policy: RetryPolicy) -> SagaDefinition<()> {
    SagaDefinition::<()>::builder("flaky")
        .step(
            Step::remote("call", "svc")
                .command(|_: &()| "GO")
                .retry(policy)
                .timeout(Duration::from_secs(5)),
        )
        .build()
        .unwrap()
}

#[test]
fn engine_schedules_retries_at_the_policy_delays_on_virtual_time() {
    let policy = RetryPolicy::exponential(Duration::from_secs(2), 2.0).with_max_attempts(3);
    let mut t = SagaHarness::new(flaky_saga(policy));
    let start = t.now();
    t.start("f-1", ()).unwrap();
    t.reply_failure("call", RETRY, "503").unwrap();
    let backoff = t.instance().next_timer().unwrap().clone();
    assert_eq!(
        backoff.fire_at,
        start.saturating_add(Duration::from_secs(2))
    );
    assert!(matches!(backoff.kind, TimerKind::Backoff { .. }));
    // Nothing is sent before the timer is due.
    t.advance(Duration::from_millis(1_999)).unwrap();
    assert_eq!(t.commands().len(), 1);
    t.advance(Duration::from_millis(1)).unwrap();
    assert_eq!(t.commands().len(), 2);
    assert_eq!(t.commands()[1].attempt, 2);
    // Second failure: 4 s.
    t.reply_failure("call", RETRY, "500").unwrap();
    let at = t.now();
    assert_eq!(
        t.instance().next_timer().unwrap().fire_at,
        at.saturating_add(Duration::from_secs(4))
    );
    t.advance(Duration::from_secs(4)).unwrap();
    assert_eq!(t.commands().len(), 3);
    // Third failure: exhausted; a compensatable step with nothing before it compensates.
    t.reply_failure("call", RETRY, "500").unwrap();
    assert_eq!(t.status(), &SagaStatus::Compensated);
    // Its outcome is unknown after a retryable failure, but it has no compensation.
    assert!(t
        .instance()
        .history
        .iter()
        .any(|h| h.what.contains("nothing to compensate")));
}

#[test]
fn engine_timeout_counts_as_a_retryable_failure() {
    let policy = RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(2);
    let mut t = SagaHarness::new(flaky_saga(policy));
    t.start("f-2", ()).unwrap();
    assert_eq!(
        t.advance(Duration::from_secs(5)).unwrap(),
        1,
        "the attempt deadline fired"
    );
    assert_eq!(t.commands().len(), 1);
    t.advance(Duration::from_secs(1)).unwrap();
    assert_eq!(t.commands().len(), 2, "retried after the backoff");
    let last = t
        .instance()
        .step("call")
        .unwrap()
        .last_error
        .clone()
        .unwrap();
    assert!(last.contains("no reply within 5s"), "{last}");
}

#[test]
fn engine_max_elapsed_gives_up_early_on_virtual_time() {
    let policy = RetryPolicy::fixed(Duration::from_secs(3))
        .with_max_attempts(100)
        .with_max_elapsed(Duration::from_secs(7));
    let mut t = SagaHarness::new(flaky_saga(policy));
    t.start("f-3", ()).unwrap();
    let mut sent = 1;
    loop {
        t.reply_failure("call", RETRY, "busy").unwrap();
        if t.status().is_settled() {
            break;
        }
        t.advance(Duration::from_secs(3)).unwrap();
        sent += 1;
        assert!(sent < 10, "max_elapsed should have stopped the retries");
    }
    // Attempts start at 0, 3, 6 s; a fourth would start at 9 s > 7 s.
    assert_eq!(t.commands().len(), 3);
    assert!(t
        .instance()
        .history
        .iter()
        .any(|h| h.what.contains("max elapsed")));
}

#[test]
fn jittered_engine_delays_are_persisted_and_bounded() {
    let policy = RetryPolicy::exponential(Duration::from_secs(10), 2.0)
        .with_max_attempts(3)
        .with_jitter(Jitter::Equal);
    let mut t = SagaHarness::new(flaky_saga(policy));
    t.start("f-4", ()).unwrap();
    let t0 = t.now();
    t.reply_failure("call", RETRY, "busy").unwrap();
    let fire = t.instance().next_timer().unwrap().fire_at;
    let waited = fire.saturating_since(t0);
    assert!(
        waited >= Duration::from_secs(5) && waited <= Duration::from_secs(10),
        "{waited:?}"
    );
    // The computed instant survives a restart unchanged.
    t.restart().unwrap();
    assert_eq!(t.instance().next_timer().unwrap().fire_at, fire);
}
