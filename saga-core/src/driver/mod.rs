//! For runtime authors: the drivers around the pure core, and the records
//! they read and write.
//!
//! A runtime (the in-memory one in this crate, the Kafka one in
//! `saga-kafka`) owns I/O, the clock and transactions. Everything else
//! lives here, once: which instances a worker holds, their timers, the undo
//! log of an open batch, participants' ledgers and retries, dead letters,
//! metrics. A runtime is a thin shell that feeds the drivers and writes what
//! they return:
//!
//! ```text
//!   runtime worker (one per partition set)         driver (no I/O, no clock)
//!   ─────────────────────────────────────         ─────────────────────────
//!   partitions assigned ── read compacted topic ──▶ restore(partition, records),
//!                                                   or restore_begin, then
//!                                                   restore_record per record
//!                                                   as read, restore_end
//!   record consumed ─────────────────────────────▶ on_record(record, now, out)
//!   clock reaches next_due() ────────────────────▶ on_due(now, out) / take_due
//!   API call (start, operate) ───────────────────▶ start / operate (…, out)
//!   participant Attempt ◀──────────────────────── on_record / take_due
//!     run it (async, with its timeout) ──────────▶ finish(attempt, result, …)
//!   batch ends: write `out` + offsets atomically ─▶ before_commit, committed()
//!   … or the transaction aborts ─────────────────▶ rolled_back()
//!   partitions revoked ──────────────────────────▶ release(partitions)
//! ```
//!
//! The rules a runtime keeps:
//!
//! - **One owner per partition.** Records of a partition go only to the
//!   driver that restored it, in offset order; timers and retries of its
//!   sagas fire only there.
//! - **Atomic batches.** The [`Record`]s a driver appends to `out` during a
//!   batch, and the input offsets of the batch, are written all or nothing.
//!   If they are not, call `rolled_back()` and deliver the batch's records
//!   again; the driver's memory then matches what is durable.
//! - **Keys and partitions.** Write each record to [`Record::partition`]
//!   when set, else to the partition of its key ([`partition_for`]), so a
//!   saga's records share a partition number on every topic.
//! - **Kinds.** Write [`Record::kind`] as the [`RECORD_KIND_HEADER`]
//!   header and hand it back in [`Incoming::kind`]. Records the drivers
//!   restore from their own topics (saga states, ledger entries) are read
//!   by key, and the kind may be left off them; the Kafka runtime does.
//! - **Time.** Pass the wall-clock time in; the drivers never read a clock.
//!
//! Inputs a driver cannot handle (not an envelope, a reply to an unknown
//! saga, an unknown record kind) never stop it: they become dead letters.
//!
//! ## Metrics
//!
//! The drivers record these through the `metrics` facade (feature
//! `metrics`, on by default; install any exporter to collect them), so
//! every runtime reports the same:
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `saga_started_total` | counter | `saga` |
//! | `saga_completed_total` | counter | `saga` |
//! | `saga_compensated_total` | counter | `saga` |
//! | `saga_parked_total` | counter | `saga` |
//! | `saga_retries_total` | counter | `saga`, `step` |
//! | `saga_dead_letters_total` | counter | `source` |
//! | `saga_duration_seconds` | histogram | `saga`, `status` |
//! | `saga_step_latency_seconds` | histogram | `saga`, `step` |
//! | `participant_attempts_total` | counter | `participant`, `result` |
//! | `participant_attempt_seconds` | histogram | `participant` |

mod budget;
pub(crate) mod metrics;
mod participant;
mod record;
mod saga;
#[cfg(feature = "tokio")]
mod wait;

pub use crate::engine::{Effect, Handled, Ignored, Input, Transition};
pub use crate::instance::{Awaiting, Timer, TimerId, TimerKind};
pub use crate::runtime::SagaService;
pub use budget::Registry;
pub use participant::{
    ledger_topic, Attempt, AttemptResult, ParticipantDriver, PARTICIPANT_STATE_KEY,
};
pub use record::{murmur2, partition_for, Incoming, Record, RecordKind, RECORD_KIND_HEADER};
pub use saga::{
    decode_state, encode_state, final_at, operator_record, start_record, start_record_traced,
    state_topic, Restored, RestoredRecord, SagaDriver, DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_SETTLED_RETENTION,
};
#[cfg(feature = "tokio")]
pub use wait::wait_settled;

#[cfg(test)]
mod tests {
    use super::Record;

    /// The keys and partitions `out` deletes (its tombstones), sorted.
    pub(crate) fn tombstones(out: &[Record]) -> Vec<(&str, Option<u32>)> {
        let mut deleted: Vec<(&str, Option<u32>)> = out
            .iter()
            .filter(|r| r.value.is_none())
            .map(|r| (r.key.as_str(), r.partition))
            .collect();
        deleted.sort_unstable();
        deleted
    }
}
