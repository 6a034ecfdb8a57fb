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

use std::time::Instant;

use saga_core::driver::{Incoming, ParticipantDriver, Record};
use saga_core::Timestamp;

use crate::worker::{Processor, Request};

pub(crate) struct ParticipantProc {
    driver: ParticipantDriver,
    rt: tokio::runtime::Handle,
}

impl ParticipantProc {
    pub(crate) fn new(driver: ParticipantDriver, rt: tokio::runtime::Handle) -> Self {
        Self { driver, rt }
    }

    /// Runs an attempt of the handler (blocking this worker thread) and
    /// records its outcome.
    fn run(&mut self, attempt: saga_core::driver::Attempt, now: Timestamp, out: &mut Vec<Record>) {
        let span = tracing::info_span!(
            "saga_kafka.participant",
            participant = %self.driver.policy().name,
            saga_id = %attempt.command().saga_id,
            saga = %attempt.command().saga,
            step = attempt.command().step.as_deref().unwrap_or(""),
            attempt = attempt.number()
        );
        let _g = span.enter();
        let started = Instant::now();
        let result = self.rt.block_on(attempt.run(now));
        self.driver
            .finish(attempt, result, started.elapsed(), Timestamp::now(), out);
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

    fn restore(&mut self, partition: u32, records: Vec<(String, Vec<u8>)>) -> Result<(), String> {
        self.driver
            .restore(partition, records)
            .map_err(|e| e.to_string())?;
        tracing::info!(participant = %self.driver.policy().name, partition, "ledger and state restored");
        Ok(())
    }

    fn release(&mut self, partitions: &[u32]) {
        self.driver.release(partitions);
    }

    fn on_message(&mut self, msg: &Incoming<'_>, now: Timestamp, out: &mut Vec<Record>) {
        if let Some(attempt) = self.driver.on_record(msg, now, out) {
            self.run(attempt, now, out);
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
        if let Some(attempt) = self.driver.take_due(now, out) {
            self.run(attempt, now, out);
        }
        true
    }

    fn take_request(&mut self) -> Option<Request> {
        None
    }

    fn before_commit(&mut self, out: &mut Vec<Record>) -> Result<(), (u32, String)> {
        self.driver
            .before_commit(out)
            .map_err(|(p, e)| (p, e.to_string()))
    }

    fn committed(&mut self) {
        self.driver.committed();
    }

    fn rolled_back(&mut self) {
        self.driver.rolled_back();
    }
}
