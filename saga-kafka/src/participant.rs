//! Participant workers: the participant driver fed from a command topic,
//! its ledger (and the participant's per-partition state) in the compacted
//! topic `<name>.ledger`, co-partitioned with the command topic.
//!
//! The participant's own per-partition state
//! ([`Participant::snapshot`](saga_core::Participant::snapshot)) is written
//! to that partition of the ledger topic in each batch's transaction, so
//! state, replies, ledger entries and offsets commit or abort together.
//! It is read back (up to the last stable offset) with the ledger when the
//! partition is assigned, before any of its commands is handled.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;

use futures::StreamExt;
use saga_core::driver::{Attempt, AttemptResult, Incoming, ParticipantDriver, Record};
use saga_core::Timestamp;
use tracing::Instrument;

use crate::worker::{Processor, Request};

pub(crate) struct ParticipantProc {
    driver: ParticipantDriver,
    rt: tokio::runtime::Handle,
    /// Attempts of the open batch not run yet, in input order, at most one
    /// per saga: they run together (up to the policy's concurrency) when
    /// the batch ends or another command of one of their sagas arrives.
    pending: Vec<Attempt>,
    /// The sagas of `pending`, by a hash of their ids (the keys of their
    /// commands): no copy of each id. Two ids with one hash only run the
    /// queue early, which is always correct.
    pending_sagas: HashSet<u64, RandomState>,
    hasher: RandomState,
    /// The longest an attempt without a policy timeout may run: a handler
    /// that never returned would stop the worker's every partition.
    attempt_limit: Duration,
}

impl ParticipantProc {
    /// A worker's processor for `driver`, running handlers on `rt`, each
    /// attempt cut off after the policy's timeout, or `attempt_limit`
    /// without one.
    pub(crate) fn new(
        driver: ParticipantDriver,
        rt: tokio::runtime::Handle,
        attempt_limit: Duration,
    ) -> Self {
        Self {
            driver,
            rt,
            pending: Vec::new(),
            pending_sagas: HashSet::default(),
            hasher: RandomState::default(),
            attempt_limit,
        }
    }

    /// The hash `pending_sagas` keeps of a saga id (a command's key).
    fn saga_hash(&self, id: &[u8]) -> u64 {
        self.hasher.hash_one(id)
    }

    /// Queues an attempt of the handler; a full queue (the policy's
    /// concurrency) runs at once.
    fn enqueue(&mut self, attempt: Attempt, out: &mut Vec<Record>) {
        let saga = self.saga_hash(attempt.command().saga_id.as_str().as_bytes());
        if self.pending_sagas.contains(&saga) {
            // (A safeguard: `on_message` and `on_due` run the saga's
            // queued attempts before the driver decides.)
            self.run_pending(out);
        }
        self.pending_sagas.insert(saga);
        self.pending.push(attempt);
        if self.pending.len() >= self.driver.policy().concurrency.max(1) {
            self.run_pending(out);
        }
    }

    /// Runs the queued attempts (blocking this worker thread; their
    /// handlers overlap up to the policy's concurrency) and records their
    /// outcomes in input order.
    fn run_pending(&mut self, out: &mut Vec<Record>) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_sagas.clear();
        let limit = self.driver.policy().concurrency.max(1);
        let name = self.driver.policy().name.clone();
        let runs = pending.iter().map(|attempt| {
            let span = tracing::info_span!(
                "saga_kafka.participant",
                participant = %name,
                saga_id = %attempt.command().saga_id,
                saga = %attempt.command().saga,
                step = attempt.command().step.as_deref().unwrap_or(""),
                attempt = attempt.number(),
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
                parent_span_id = tracing::field::Empty,
            );
            // In the command's trace (header or field): the attempt's own
            // span nests in this one.
            if let Some(parent) = attempt.command().traceparent {
                saga_core::trace::link_span(&span, Some(&parent));
            }
            let limit = attempt.timeout().unwrap_or(self.attempt_limit);
            async move {
                let started = Instant::now();
                let run = attempt.run_unbounded(Timestamp::now());
                let result = tokio::time::timeout(limit, run)
                    .await
                    .unwrap_or_else(|_| AttemptResult::timed_out(limit));
                (result, started.elapsed())
            }
            .instrument(span)
        });
        let results: Vec<_> = self
            .rt
            .block_on(futures::stream::iter(runs).buffered(limit).collect());
        for (attempt, (result, took)) in pending.into_iter().zip(results) {
            self.driver
                .finish(attempt, result, took, Timestamp::now(), out);
        }
    }
}

impl Processor for ParticipantProc {
    fn name(&self) -> &str {
        &self.driver.policy().name
    }

    fn topics(&self) -> Vec<String> {
        vec![self.driver.channel().to_owned()]
    }

    fn state_topic(&self) -> &str {
        self.driver.ledger_topic()
    }

    fn restore_begin(&mut self, partition: u32) {
        self.driver.restore_begin(partition);
    }

    fn restore_record(&mut self, partition: u32, key: &str, value: Option<&[u8]>) {
        self.driver.restore_record(partition, key, value);
    }

    fn restore_end(&mut self, partition: u32) -> Result<(), String> {
        self.driver
            .restore_end(partition)
            .map_err(|e| e.to_string())?;
        tracing::info!(participant = %self.driver.policy().name, partition, "ledger and state restored");
        Ok(())
    }

    fn release(&mut self, partitions: &[u32]) {
        self.driver.release(partitions);
    }

    fn on_message(&mut self, msg: &Incoming<'_>, now: Timestamp, out: &mut Vec<Record>) {
        let Some(command) = self.driver.read_command(msg, now, out) else {
            return;
        };
        // The driver decides from the ledger (a duplicate, a superseded or
        // remembered attempt, a fence), which a queued command of the same
        // saga has not written yet: that one runs first. (By the command's
        // saga id: its record's key may be another.)
        if self
            .pending_sagas
            .contains(&self.saga_hash(command.saga_id.as_str().as_bytes()))
        {
            self.run_pending(out);
        }
        if let Some(attempt) = self.driver.handle_command(msg.partition, command, now, out) {
            self.enqueue(attempt, out);
        }
    }

    fn reject(&mut self, msg: &Incoming<'_>, why: &str, now: Timestamp, out: &mut Vec<Record>) {
        self.driver.reject(msg, why, now, out);
    }

    fn next_due(&self) -> Option<Timestamp> {
        self.driver.next_due()
    }

    fn on_due(&mut self, now: Timestamp, out: &mut Vec<Record>) -> bool {
        if self.driver.next_due().is_none_or(|at| at > now) {
            return false;
        }
        // A due retry is checked against the ledger too (rare: run the
        // queue first).
        self.run_pending(out);
        if let Some(attempt) = self.driver.take_due(now, out) {
            self.enqueue(attempt, out);
        }
        true
    }

    fn reject_due(&mut self, why: &str, now: Timestamp, out: &mut Vec<Record>) -> Option<u32> {
        self.driver.reject_due(why, now, out)
    }

    fn due_partition(&self) -> Option<u32> {
        self.driver.due_partition()
    }

    fn take_request(&mut self) -> Option<Request> {
        None
    }

    fn before_commit(&mut self, out: &mut Vec<Record>) -> Result<(), (u32, String)> {
        self.run_pending(out);
        self.driver
            .before_commit(out)
            .map_err(|(p, e)| (p, e.to_string()))
    }

    fn committed(&mut self) {
        self.driver.committed();
    }

    fn rolled_back(&mut self) {
        // Not run: the batch is read again.
        self.pending.clear();
        self.pending_sagas.clear();
        self.driver.rolled_back();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use saga_core::driver::RecordKind;
    use saga_core::{
        Envelope, Participant, ParticipantContext, ParticipantPolicy, Phase, ReplyOutcome, SagaId,
        StepError,
    };
    use serde_json::{json, Value};

    use super::*;

    const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

    /// Sleeps 50 ms per command (for ever for tag `hang`) and logs when
    /// each started and ended.
    #[derive(Default)]
    struct Slow {
        log: Mutex<Vec<(String, &'static str)>>,
        running: Mutex<(usize, usize)>,
    }

    #[async_trait::async_trait]
    impl Participant for Slow {
        type Command = Value;
        type Reply = Value;
        type Error = StepError;
        async fn handle(
            &self,
            command: Value,
            _: &mut ParticipantContext,
        ) -> Result<Value, StepError> {
            let tag = command["tag"].as_str().unwrap_or_default().to_owned();
            {
                let mut r = self.running.lock().unwrap();
                r.0 += 1;
                r.1 = r.1.max(r.0);
            }
            self.log.lock().unwrap().push((tag.clone(), "start"));
            if tag == "hang" {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.log.lock().unwrap().push((tag.clone(), "end"));
            self.running.lock().unwrap().0 -= 1;
            Ok(json!({ "tag": tag }))
        }
    }

    fn command(saga: &str, step: &str, tag: &str) -> Vec<u8> {
        let id = SagaId::new(saga);
        let mut c = Envelope::command(
            Envelope::command_id("job", &id, step, Phase::Forward, 1),
            "svc",
            id,
            "job",
            json!({ "tag": tag }),
            T0,
        );
        c.step = Some(step.into());
        c.phase = Some(Phase::Forward);
        c.attempt = 1;
        c.reply_to = Some("job.replies".into());
        c.to_bytes()
    }

    /// A participant proc over a fresh `Slow`, with the runtime its
    /// handlers run on (keep it alive).
    fn setup(policy: ParticipantPolicy) -> (tokio::runtime::Runtime, Arc<Slow>, ParticipantProc) {
        setup_limited(policy, Duration::from_secs(30))
    }

    /// As `setup`, each attempt cut off after `limit`.
    fn setup_limited(
        policy: ParticipantPolicy,
        limit: Duration,
    ) -> (tokio::runtime::Runtime, Arc<Slow>, ParticipantProc) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let slow = Arc::new(Slow::default());
        let mut driver = ParticipantDriver::new("svc", policy, slow.clone());
        driver.restore(0, Vec::new()).unwrap();
        let p = ParticipantProc::new(driver, rt.handle().clone(), limit);
        (rt, slow, p)
    }

    fn deliver(
        p: &mut ParticipantProc,
        saga: &str,
        step: &str,
        tag: &str,
        offset: u64,
        out: &mut Vec<Record>,
    ) {
        deliver_keyed(p, saga, saga, step, tag, offset, out);
    }

    /// As `deliver`, the record keyed by `key`.
    fn deliver_keyed(
        p: &mut ParticipantProc,
        saga: &str,
        key: &str,
        step: &str,
        tag: &str,
        offset: u64,
        out: &mut Vec<Record>,
    ) {
        let bytes = command(saga, step, tag);
        let msg = Incoming {
            topic: "svc",
            partition: 0,
            offset,
            key: Some(key.as_bytes()),
            value: Some(&bytes),
            kind: None,
            traceparent: None,
        };
        p.on_message(&msg, T0, out);
    }

    /// The tags of the replies in `out`, in order.
    fn replies(out: &[Record]) -> Vec<String> {
        out.iter()
            .filter(|r| r.kind == RecordKind::Message && r.topic == "job.replies")
            .map(|r| {
                let env = Envelope::from_bytes(r.value.as_deref().unwrap()).unwrap();
                env.payload["tag"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    #[test]
    fn a_handler_that_never_returns_is_cut_off_and_the_batch_goes_on() {
        let limit = Duration::from_millis(200);
        let (_rt, _slow, mut p) = setup_limited(ParticipantPolicy::new("svc"), limit);
        let mut out = Vec::new();
        deliver(&mut p, "a", "one", "hang", 1, &mut out);
        deliver(&mut p, "b", "one", "b1", 2, &mut out);
        let started = Instant::now();
        p.before_commit(&mut out).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5), "cut off");
        let answers: Vec<(String, Option<ReplyOutcome>)> = out
            .iter()
            .filter(|r| r.kind == RecordKind::Message && r.topic == "job.replies")
            .map(|r| {
                let env = Envelope::from_bytes(r.value.as_deref().unwrap()).unwrap();
                (env.saga_id.to_string(), env.outcome)
            })
            .collect();
        assert_eq!(answers.len(), 2, "{answers:?}");
        assert!(
            matches!(&answers[0], (a, Some(ReplyOutcome::Failure { error, .. })) if a == "a" && error.contains("timed out")),
            "{answers:?}"
        );
        assert_eq!(answers[1], ("b".to_owned(), Some(ReplyOutcome::Success)));
    }

    #[test]
    fn a_command_redelivered_in_its_batch_under_another_key_than_its_saga_runs_once() {
        let (_rt, slow, mut p) = setup(ParticipantPolicy::new("svc"));
        let mut out = Vec::new();
        // Published by someone else, keyed by order rather than by saga.
        deliver_keyed(&mut p, "a", "order-1", "one", "a1", 1, &mut out);
        deliver_keyed(&mut p, "a", "order-1", "one", "a1", 2, &mut out);
        p.before_commit(&mut out).unwrap();
        let log = slow.log.lock().unwrap().clone();
        let runs = log
            .iter()
            .filter(|(t, w)| t == "a1" && *w == "start")
            .count();
        assert_eq!(runs, 1, "{log:?}");
        // The redelivery is answered from the ledger.
        assert_eq!(replies(&out), ["a1", "a1"]);
    }

    #[test]
    fn commands_of_different_sagas_overlap_and_one_sagas_commands_run_in_order() {
        let (_rt, slow, mut p) = setup(ParticipantPolicy::new("svc"));
        let mut out = Vec::new();
        let started = std::time::Instant::now();
        deliver(&mut p, "a", "one", "a1", 1, &mut out);
        deliver(&mut p, "b", "one", "b1", 2, &mut out);
        deliver(&mut p, "c", "one", "c1", 3, &mut out);
        // Saga `a` again: its first command must be done before this one starts.
        deliver(&mut p, "a", "two", "a2", 4, &mut out);
        deliver(&mut p, "d", "one", "d1", 5, &mut out);
        p.before_commit(&mut out).unwrap();
        let took = started.elapsed();

        assert_eq!(
            slow.running.lock().unwrap().1,
            3,
            "a1, b1 and c1 ran together"
        );
        let log = slow.log.lock().unwrap().clone();
        let at =
            |tag: &str, what: &str| log.iter().position(|e| e.0 == tag && e.1 == what).unwrap();
        assert!(at("a1", "end") < at("a2", "start"), "{log:?}");
        // Two rounds of 50 ms, not five.
        assert!(took < Duration::from_millis(200), "took {took:?}");
        // Replies in input order, every command answered once.
        assert_eq!(replies(&out), ["a1", "b1", "c1", "a2", "d1"]);
    }

    #[test]
    fn a_command_delivered_twice_in_one_batch_runs_once_and_is_answered_twice() {
        let (_rt, slow, mut p) = setup(ParticipantPolicy::new("svc"));
        let mut out = Vec::new();
        deliver(&mut p, "a", "one", "a1", 1, &mut out);
        deliver(&mut p, "b", "one", "b1", 2, &mut out);
        // The same command again (a redelivery) while the first is queued.
        deliver(&mut p, "a", "one", "a1", 3, &mut out);
        p.before_commit(&mut out).unwrap();
        let log = slow.log.lock().unwrap().clone();
        let runs = log
            .iter()
            .filter(|(tag, what)| tag == "a1" && *what == "start")
            .count();
        assert_eq!(runs, 1, "the handler ran once: {log:?}");
        assert_eq!(
            replies(&out),
            ["a1", "b1", "a1"],
            "answered again, after the first answer"
        );
    }

    #[test]
    fn concurrency_one_runs_each_command_as_it_arrives() {
        let (_rt, slow, mut p) = setup(ParticipantPolicy::new("svc").concurrency(1));
        let mut out = Vec::new();
        deliver(&mut p, "a", "one", "a1", 1, &mut out);
        assert_eq!(replies(&out), ["a1"], "answered before the batch ends");
        deliver(&mut p, "b", "one", "b1", 2, &mut out);
        p.before_commit(&mut out).unwrap();
        assert_eq!(slow.running.lock().unwrap().1, 1);
        assert_eq!(replies(&out), ["a1", "b1"]);
    }

    #[test]
    fn a_rolled_back_batch_drops_the_commands_it_had_not_run() {
        let (_rt, slow, mut p) = setup(ParticipantPolicy::new("svc"));
        let mut out = Vec::new();
        deliver(&mut p, "a", "one", "a1", 1, &mut out);
        deliver(&mut p, "b", "one", "b1", 2, &mut out);
        p.rolled_back();
        let mut after = Vec::new();
        p.before_commit(&mut after).unwrap();
        assert!(replies(&after).is_empty());
        assert!(slow.log.lock().unwrap().is_empty(), "nothing ran");
        // Read again, they are handled as new.
        deliver(&mut p, "a", "one", "a1", 1, &mut after);
        p.before_commit(&mut after).unwrap();
        assert_eq!(replies(&after), ["a1"]);
    }
}
