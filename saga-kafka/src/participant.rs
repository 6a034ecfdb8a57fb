//! Participant workers: consume a command topic, run the participant with
//! deduplication, retries and dead letters, keep the ledgers in a compacted
//! topic keyed by saga id (co-partitioned with the command topic).
//!
//! The participant's own per-partition state ([`Participant::snapshot`])
//! lives in the same ledger topic: after each batch, the snapshot of every
//! partition the batch touched is produced explicitly to that partition of
//! the ledger topic under the reserved key [`SHARD_KEY`], in the batch's
//! transaction, so state, replies, ledgers and offsets commit or abort
//! together. Compaction keeps the latest snapshot per partition. It is read
//! back (up to the last stable offset) with the ledgers when the partition
//! is assigned, before any of its commands is handled.
//!
//! [`Participant::snapshot`]: saga_core::Participant::snapshot

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;
use std::sync::Arc;
use std::time::Instant;

use saga_core::{
    record_attempt, record_dead_letters, AttemptResult, DeadLetter, Delivery, DynParticipant,
    Effect, Envelope, MessageId, ParticipantLedger, ParticipantPolicy, SagaId, Timestamp,
};

use crate::config::KafkaConfig;
use crate::error::Result;
use crate::store::read_latest;
use crate::worker::{Incoming, Out, Processor, Request};

/// The reserved key of a participant's per-partition state snapshot in its
/// ledger topic (one record per partition, produced to that partition; its
/// NUL byte keeps it apart from saga ids). Marked with the `saga-record:
/// shard` header.
pub const SHARD_KEY: &str = "\u{0}saga-kafka.shard";

const SHARD: &str = "shard";

/// The ledger topic of participant `name`.
pub fn ledger_topic(name: &str) -> String {
    format!("{name}.ledger")
}

pub(crate) struct ParticipantProc {
    participant: Arc<dyn DynParticipant>,
    policy: ParticipantPolicy,
    channel: String,
    ledger_topic: String,
    rt: tokio::runtime::Handle,
    cfg: Arc<KafkaConfig>,
    ledgers: HashMap<SagaId, (i32, ParticipantLedger)>,
    retries: BTreeSet<(Timestamp, SagaId, MessageId)>,
    undo: HashMap<SagaId, Option<(i32, ParticipantLedger)>>,
    /// The last committed snapshot of each owned partition (what an abort
    /// restores).
    shards: HashMap<i32, Option<Value>>,
    /// Partitions the open batch handled commands from.
    touched: BTreeSet<i32>,
    /// Snapshots written in the open batch, committed with it.
    written: HashMap<i32, Option<Value>>,
}

fn env_out(env: &Envelope) -> Out {
    Out {
        topic: env.channel.clone(),
        key: env.key().to_owned(),
        payload: env.to_bytes(),
        record: None,
        partition: None,
    }
}

impl ParticipantProc {
    pub(crate) fn new(
        participant: Arc<dyn DynParticipant>,
        policy: ParticipantPolicy,
        channel: String,
        cfg: Arc<KafkaConfig>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            participant,
            ledger_topic: ledger_topic(&policy.name),
            policy,
            channel,
            rt,
            cfg,
            ledgers: HashMap::new(),
            retries: BTreeSet::new(),
            undo: HashMap::new(),
            shards: HashMap::new(),
            touched: BTreeSet::new(),
            written: HashMap::new(),
        }
    }

    fn put(&mut self, id: &SagaId, new: Option<(i32, ParticipantLedger)>) {
        if let Some((_, old)) = self.ledgers.get(id) {
            for r in old.retries.values() {
                self.retries
                    .remove(&(r.next_attempt_at, id.clone(), r.command.id.clone()));
            }
        }
        match new {
            Some((p, l)) => {
                for r in l.retries.values() {
                    self.retries
                        .insert((r.next_attempt_at, id.clone(), r.command.id.clone()));
                }
                self.ledgers.insert(id.clone(), (p, l));
            }
            None => {
                self.ledgers.remove(id);
            }
        }
    }

    fn change(&mut self, id: &SagaId, new: (i32, ParticipantLedger)) {
        if !self.undo.contains_key(id) {
            let old = self.ledgers.get(id).cloned();
            self.undo.insert(id.clone(), old);
        }
        self.put(id, Some(new));
    }

    /// Runs attempt `attempt` of `command` and records it in the saga's ledger.
    fn attempt(&mut self, partition: i32, command: &Envelope, attempt: u32, out: &mut Vec<Out>) {
        let span = tracing::info_span!("saga_kafka.participant", participant = %self.policy.name, saga_id = %command.saga_id, saga = %command.saga, step = command.step.as_deref().unwrap_or(""), attempt);
        let _g = span.enter();
        let now = Timestamp::now();
        let started = Instant::now();
        self.touched.insert(partition);
        let result = self.rt.block_on(self.participant.attempt(
            command,
            attempt,
            u32::try_from(partition).unwrap_or(0),
            self.policy.timeout,
            now,
        ));
        record_attempt(&self.policy.name, &result, started.elapsed().as_secs_f64());
        if let AttemptResult::Failed { error, .. } = &result {
            tracing::debug!(%error, "attempt failed");
        }
        let done = Timestamp::now();
        let mut ledger = self
            .ledgers
            .get(&command.saga_id)
            .map(|(_, l)| l.clone())
            .unwrap_or_default();
        let participant = self.participant.clone();
        let effects = ledger.record(&self.policy, command, attempt, result, done, |d| {
            participant.dead_letter_reply(d, done)
        });
        record_dead_letters(&effects);
        for e in &effects {
            match e {
                Effect::Send(env) => out.push(env_out(env)),
                Effect::DeadLetter(d) => out.push(env_out(&d.to_envelope())),
                Effect::ScheduleTimer(_) | Effect::CancelTimer(_) => {}
            }
        }
        out.push(Out {
            topic: self.ledger_topic.clone(),
            key: command.saga_id.as_str().to_owned(),
            payload: serde_json::to_vec(&ledger).unwrap_or_default(),
            record: None,
            partition: None,
        });
        let id = command.saga_id.clone();
        self.change(&id, (partition, ledger));
    }
}

impl Processor for ParticipantProc {
    fn topics(&self) -> Vec<String> {
        vec![self.channel.clone()]
    }

    fn restore(&mut self, partitions: &[i32]) -> Result<()> {
        let records = read_latest(&self.cfg, &self.ledger_topic, Some(partitions))?;
        let mut shards: HashMap<i32, Option<Value>> =
            partitions.iter().map(|p| (*p, None)).collect();
        for (p, key, value) in records {
            if value.is_empty() {
                continue;
            }
            if key == SHARD_KEY {
                match serde_json::from_slice::<Value>(&value) {
                    Ok(v) => {
                        shards.insert(p, Some(v));
                    }
                    Err(e) => {
                        tracing::error!(partition = p, error = %e, "corrupt state snapshot: starting empty")
                    }
                }
                continue;
            }
            match serde_json::from_slice::<ParticipantLedger>(&value) {
                Ok(l) => self.put(&SagaId::new(key), Some((p, l))),
                Err(e) => tracing::error!(saga_id = %key, error = %e, "corrupt ledger: skipped"),
            }
        }
        for (p, snapshot) in shards {
            self.participant
                .restore(u32::try_from(p).unwrap_or(0), snapshot.clone());
            self.shards.insert(p, snapshot);
        }
        tracing::info!(participant = %self.policy.name, partitions = ?partitions, "ledgers and state restored");
        Ok(())
    }

    fn release(&mut self, partitions: &[i32]) {
        let gone: Vec<SagaId> = self
            .ledgers
            .iter()
            .filter(|(_, (p, _))| partitions.contains(p))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.put(&id, None);
        }
        for p in partitions {
            self.shards.remove(p);
        }
    }

    fn on_message(&mut self, msg: &Incoming<'_>, now: Timestamp, out: &mut Vec<Out>) {
        let command = match Envelope::from_bytes(msg.payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(topic = msg.topic, offset = msg.offset, error = %e, "poison message: dead-lettered");
                let original = Envelope::event(
                    MessageId::new(format!("{}/{}/{}", msg.topic, msg.partition, msg.offset)),
                    msg.topic,
                    SagaId::new(""),
                    "",
                    serde_json::Value::String(String::from_utf8_lossy(msg.payload).into_owned()),
                    now,
                );
                let dead = DeadLetter {
                    id: MessageId::new(format!("{}/dead-letter", original.id)),
                    channel: self.policy.dead_letter_channel.clone(),
                    source: self.policy.name.clone(),
                    original,
                    failure_timestamp: now,
                    retry_count: 0,
                    reason: "not an envelope".into(),
                    last_error: e.to_string(),
                };
                out.push(env_out(&dead.to_envelope()));
                return;
            }
        };
        let delivery = self
            .ledgers
            .get(&command.saga_id)
            .map(|(_, l)| l.delivery(&command))
            .unwrap_or(Delivery::Attempt(1));
        match delivery {
            Delivery::Attempt(n) => self.attempt(msg.partition, &command, n, out),
            Delivery::Duplicate(reply) => {
                tracing::debug!(participant = %self.policy.name, message_id = %command.id, "duplicate command: answering again");
                if let Some(r) = reply {
                    out.push(env_out(&r));
                }
            }
            Delivery::AlreadyScheduled => {}
        }
    }

    fn next_due(&self) -> Option<Timestamp> {
        self.retries.iter().next().map(|(at, _, _)| *at)
    }

    fn on_due(&mut self, now: Timestamp, out: &mut Vec<Out>) -> bool {
        let Some((at, id, mid)) = self.retries.iter().next().cloned() else {
            return false;
        };
        if at > now {
            return false;
        }
        self.retries.remove(&(at, id.clone(), mid.clone()));
        let Some((p, pending)) = self
            .ledgers
            .get(&id)
            .and_then(|(p, l)| l.retries.get(&mid).map(|r| (*p, r.clone())))
        else {
            return true;
        };
        self.attempt(p, &pending.command, pending.attempts + 1, out);
        true
    }

    fn take_request(&mut self) -> Option<Request> {
        None
    }

    fn before_commit(&mut self, out: &mut Vec<Out>) {
        for p in std::mem::take(&mut self.touched) {
            let Some(snapshot) = self.participant.snapshot(u32::try_from(p).unwrap_or(0)) else {
                continue;
            };
            out.push(Out {
                topic: self.ledger_topic.clone(),
                key: SHARD_KEY.to_owned(),
                payload: serde_json::to_vec(&snapshot).unwrap_or_default(),
                record: Some(SHARD),
                partition: Some(p),
            });
            self.written.insert(p, Some(snapshot));
        }
    }

    fn committed(&mut self) {
        self.undo.clear();
        self.touched.clear();
        self.shards.extend(self.written.drain());
    }

    fn rolled_back(&mut self) {
        for (id, old) in std::mem::take(&mut self.undo) {
            self.put(&id, old);
        }
        // The participant's own state goes back to the last committed
        // snapshot of every partition the batch changed.
        let touched = std::mem::take(&mut self.touched);
        let written = std::mem::take(&mut self.written);
        for p in touched.into_iter().chain(written.into_keys()) {
            let snapshot = self.shards.get(&p).cloned().flatten();
            self.participant
                .restore(u32::try_from(p).unwrap_or(0), snapshot);
        }
        self.retries = self
            .ledgers
            .iter()
            .flat_map(|(id, (_, l))| {
                l.retries
                    .values()
                    .map(move |r| (r.next_attempt_at, id.clone(), r.command.id.clone()))
            })
            .collect();
    }
}
