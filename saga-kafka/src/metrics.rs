//! The metrics the Kafka runtime records, through the `metrics` facade
//! (every metric the project exports is listed in `docs/METRICS.md`):
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `saga_kafka_consumer_lag` | gauge | `group`, `topic`, `partition` |
//! | `saga_kafka_commit_seconds` | histogram | `component` |
//! | `saga_kafka_batch_messages` | histogram | `component` |
//! | `saga_kafka_message_seconds` | histogram | `component` |
//! | `saga_kafka_aborts_total` | counter | `component`, `cause` |
//! | `saga_kafka_authorization_failures_total` | counter | `component` |
//! | `saga_kafka_records_produced_total` | counter | `component`, `topic` |
//! | `saga_kafka_bytes_produced_total` | counter | `component`, `topic` |
//!
//! The hot path stays cheap: a worker resolves its handles (and builds
//! their label sets) once, and again only when the process's recorder
//! changes (an exporter installed after the runtime started still sees
//! everything from its next batch on); a message costs one clock read
//! when it arrives and one histogram sample when its batch commits, a
//! produced record one lookup of its topic.
//! Lag comes from librdkafka's statistics (every
//! [`LAG_INTERVAL_MS`]), delivered inside the worker's own `poll`: it
//! never blocks the batch loop and asks the broker nothing.

use std::collections::HashMap;
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, SharedString};
use serde::Deserialize;

/// How often (ms) consumers report their statistics, from which the lag
/// gauges are set. `KafkaConfig::set("statistics.interval.ms", ..)`
/// overrides it (`"0"`: no lag metrics).
pub(crate) const LAG_INTERVAL_MS: u64 = 2_000;

/// Why a batch (or a request's transaction) was aborted: the values of
/// the label `cause` of `saga_kafka_aborts_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AbortCause {
    /// The commit (or a produce, or sending the offsets) failed: the
    /// broker away, a timeout, a fenced or otherwise abortable error.
    CommitFailed,
    /// The broker (or the client) refused a record as it is (too large,
    /// invalid), or the batch's state could not be written.
    RecordRefused,
    /// The cluster refused the worker for want of an ACL.
    NotAuthorized,
    /// The assignment was lost (a rebalance, or the consumer failed and
    /// joins again) before the batch could commit.
    Rebalance,
    /// The producer hit a fatal error (fenced, or the abort itself
    /// failed): it is rebuilt.
    Fatal,
}

impl AbortCause {
    const ALL: [AbortCause; 5] = [
        AbortCause::CommitFailed,
        AbortCause::RecordRefused,
        AbortCause::NotAuthorized,
        AbortCause::Rebalance,
        AbortCause::Fatal,
    ];

    /// The label value.
    pub(crate) fn label(self) -> &'static str {
        match self {
            AbortCause::CommitFailed => "commit_failed",
            AbortCause::RecordRefused => "record_refused",
            AbortCause::NotAuthorized => "not_authorized",
            AbortCause::Rebalance => "rebalance",
            AbortCause::Fatal => "fatal",
        }
    }
}

/// An address that identifies the recorder in use, to notice when it
/// changes (the global one installed, a thread-local one in a test).
fn recorder_id() -> usize {
    metrics::with_recorder(|r| r as *const dyn metrics::Recorder as *const () as usize)
}

/// The records and bytes one worker produced to one topic: the counters,
/// and what the open transaction added (counted once it commits).
struct Produced {
    topic: String,
    records: Counter,
    bytes: Counter,
    pending_records: u64,
    pending_bytes: u64,
}

impl Produced {
    fn new(component: &SharedString, topic: &str) -> Self {
        let labels = [
            ("component", component.clone()),
            ("topic", SharedString::from(topic.to_owned())),
        ];
        Self {
            topic: topic.to_owned(),
            records: metrics::counter!("saga_kafka_records_produced_total", &labels),
            bytes: metrics::counter!("saga_kafka_bytes_produced_total", &labels),
            pending_records: 0,
            pending_bytes: 0,
        }
    }
}

/// One worker's metric handles (label `component`: the saga's or the
/// participant's name, or `publisher`).
pub(crate) struct WorkerMetrics {
    component: SharedString,
    recorder: usize,
    commit: Histogram,
    batch: Histogram,
    message: Histogram,
    aborts: [Counter; 5],
    authorization: Counter,
    /// Per topic written, in order of first use: a worker writes a few
    /// topics, so a scan comparing names beats hashing each one.
    produced: Vec<Produced>,
}

impl WorkerMetrics {
    pub(crate) fn new(component: &str) -> Self {
        let component = SharedString::from(component.to_owned());
        let (commit, batch, message, aborts, authorization) = Self::handles(&component);
        Self {
            component,
            recorder: recorder_id(),
            commit,
            batch,
            message,
            aborts,
            authorization,
            produced: Vec::new(),
        }
    }

    #[allow(clippy::type_complexity)]
    fn handles(
        component: &SharedString,
    ) -> (Histogram, Histogram, Histogram, [Counter; 5], Counter) {
        let c = [("component", component.clone())];
        let aborts = AbortCause::ALL.map(|cause| {
            metrics::counter!("saga_kafka_aborts_total", "component" => component.clone(), "cause" => cause.label())
        });
        (
            metrics::histogram!("saga_kafka_commit_seconds", &c),
            metrics::histogram!("saga_kafka_batch_messages", &c),
            metrics::histogram!("saga_kafka_message_seconds", &c),
            aborts,
            metrics::counter!("saga_kafka_authorization_failures_total", &c),
        )
    }

    /// Resolves the handles again if the recorder changed since they were
    /// (once per batch: one atomic load when it did not).
    pub(crate) fn refresh(&mut self) {
        let now = recorder_id();
        if now == self.recorder {
            return;
        }
        self.recorder = now;
        let (commit, batch, message, aborts, authorization) = Self::handles(&self.component);
        (self.commit, self.batch, self.message) = (commit, batch, message);
        self.aborts = aborts;
        self.authorization = authorization;
        for p in &mut self.produced {
            let fresh = Produced::new(&self.component, &p.topic);
            (p.records, p.bytes) = (fresh.records, fresh.bytes);
        }
    }

    /// A batch of `inputs` (messages, timers, requests) committed; the
    /// commit took `secs`; its messages reached the worker at `arrivals`.
    /// What it produced is counted, and returned: records, and bytes of
    /// keys and values.
    pub(crate) fn committed(
        &mut self,
        inputs: usize,
        secs: f64,
        arrivals: &[Instant],
    ) -> (u64, u64) {
        self.commit.record(secs);
        self.batch.record(inputs as f64);
        let now = Instant::now();
        for at in arrivals {
            self.message
                .record(now.saturating_duration_since(*at).as_secs_f64());
        }
        let (mut records, mut bytes) = (0, 0);
        for p in &mut self.produced {
            if p.pending_records > 0 {
                p.records.increment(p.pending_records);
                p.bytes.increment(p.pending_bytes);
                records += p.pending_records;
                bytes += p.pending_bytes;
                p.pending_records = 0;
                p.pending_bytes = 0;
            }
        }
        (records, bytes)
    }

    /// The open transaction was aborted for `cause`: what it produced is
    /// not counted.
    pub(crate) fn aborted(&mut self, cause: AbortCause) {
        self.aborts[cause as usize].increment(1);
        self.forget_pending();
    }

    /// What the open transaction produced will not be counted (it ended
    /// without a commit, or was never counted as an abort).
    pub(crate) fn forget_pending(&mut self) {
        for p in &mut self.produced {
            p.pending_records = 0;
            p.pending_bytes = 0;
        }
    }

    /// The cluster refused the worker for want of an ACL.
    pub(crate) fn unauthorized(&self) {
        self.authorization.increment(1);
    }

    /// A record of `bytes` (key and value) was produced to `topic` in the
    /// open transaction.
    pub(crate) fn produced(&mut self, topic: &str, bytes: usize) {
        let i = match self.produced.iter().position(|p| p.topic == topic) {
            Some(i) => i,
            None => {
                self.produced.push(Produced::new(&self.component, topic));
                self.produced.len() - 1
            }
        };
        let p = &mut self.produced[i];
        p.pending_records += 1;
        p.pending_bytes += bytes as u64;
    }
}

/// The parts of librdkafka's statistics (JSON) the lag needs.
#[derive(Deserialize)]
struct Stats {
    #[serde(default)]
    topics: HashMap<String, TopicStats>,
}

#[derive(Deserialize)]
struct TopicStats {
    #[serde(default)]
    partitions: HashMap<String, PartitionStats>,
}

#[derive(Deserialize)]
struct PartitionStats {
    partition: i32,
    fetch_state: String,
    app_offset: i64,
    committed_offset: i64,
    lo_offset: i64,
    hi_offset: i64,
}

impl PartitionStats {
    /// Whether the consumer has the partition assigned (and fetches it,
    /// or will once it is resumed).
    fn assigned(&self) -> bool {
        self.partition >= 0
            && matches!(
                self.fetch_state.as_str(),
                "active" | "offset-query" | "offset-wait" | "validate-epoch-wait"
            )
    }

    /// High watermark − the next offset the worker processes, if the
    /// high watermark is known (it comes with each fetch response).
    ///
    /// The position is the last record handed to the worker + 1 (past
    /// transaction markers too); before the first since the assignment, the
    /// group's committed offset; with none, the log's start (the consumers
    /// read from the earliest offset).
    fn lag(&self) -> Option<u64> {
        if self.hi_offset < 0 {
            return None;
        }
        let position = [self.app_offset, self.committed_offset, self.lo_offset]
            .into_iter()
            .find(|o| *o >= 0)?;
        Some(self.hi_offset.saturating_sub(position).max(0) as u64)
    }
}

/// The lag gauges of one consumer (group): set from each statistics
/// report, for the partitions of `topics` it has assigned. A partition
/// that went away is set to 0 (another member reports it now: aggregate
/// with `max by (group, topic, partition)`).
pub(crate) struct LagGauges {
    group: SharedString,
    topics: Vec<String>,
    recorder: usize,
    gauges: HashMap<(String, i32), Gauge>,
}

impl LagGauges {
    pub(crate) fn new(group: &str, topics: &[String]) -> Self {
        Self {
            group: SharedString::from(group.to_owned()),
            topics: topics.to_vec(),
            recorder: recorder_id(),
            gauges: HashMap::new(),
        }
    }

    fn gauge(&self, topic: &str, partition: i32) -> Gauge {
        metrics::gauge!(
            "saga_kafka_consumer_lag",
            "group" => self.group.clone(),
            "topic" => topic.to_owned(),
            "partition" => partition.to_string()
        )
    }

    /// One statistics report (librdkafka's JSON).
    pub(crate) fn report(&mut self, json: &[u8]) {
        let stats: Stats = match serde_json::from_slice(json) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "unreadable client statistics: lag not updated");
                return;
            }
        };
        let now = recorder_id();
        if now != self.recorder {
            self.recorder = now;
            self.gauges.clear();
        }
        let mut seen: Vec<(String, i32)> = Vec::new();
        for topic in &self.topics {
            let Some(t) = stats.topics.get(topic) else {
                continue;
            };
            for p in t.partitions.values().filter(|p| p.assigned()) {
                let Some(lag) = p.lag() else { continue };
                let key = (topic.clone(), p.partition);
                if !self.gauges.contains_key(&key) {
                    let g = self.gauge(topic, p.partition);
                    self.gauges.insert(key.clone(), g);
                }
                self.gauges[&key].set(lag as f64);
                seen.push(key);
            }
        }
        self.gauges.retain(|key, g| {
            let keep = seen.contains(key);
            if !keep {
                g.set(0.0);
            }
            keep
        });
    }
}

/// A consumer that goes away (stopped, or replaced after a fatal error)
/// no longer reports its partitions: their gauges go to 0, so a stale
/// value does not outlive it.
impl Drop for LagGauges {
    fn drop(&mut self) {
        for g in self.gauges.values() {
            g.set(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(fetch_state: &str, app: i64, committed: i64, lo: i64, hi: i64) -> PartitionStats {
        PartitionStats {
            partition: 0,
            fetch_state: fetch_state.to_owned(),
            app_offset: app,
            committed_offset: committed,
            lo_offset: lo,
            hi_offset: hi,
        }
    }

    #[test]
    fn lag_is_the_high_watermark_minus_the_position_handed_to_the_worker() {
        assert_eq!(partition("active", 90, 10, 0, 100).lag(), Some(10));
        assert_eq!(partition("active", 100, 10, 0, 100).lag(), Some(0));
    }

    #[test]
    fn lag_before_the_first_record_counts_from_the_committed_offset_else_the_log_start() {
        assert_eq!(partition("active", -1001, 40, 0, 100).lag(), Some(60));
        assert_eq!(partition("active", -1001, -1001, 5, 100).lag(), Some(95));
    }

    #[test]
    fn lag_is_unknown_until_a_fetch_brought_the_high_watermark() {
        assert_eq!(partition("active", 5, 5, 0, -1001).lag(), None);
    }

    #[test]
    fn only_assigned_partitions_are_reported() {
        assert!(partition("active", 0, 0, 0, 0).assigned());
        assert!(partition("offset-query", 0, 0, 0, 0).assigned());
        assert!(!partition("none", 0, 0, 0, 0).assigned());
        assert!(!partition("stopped", 0, 0, 0, 0).assigned());
        let mut ua = partition("active", 0, 0, 0, 0);
        ua.partition = -1;
        assert!(!ua.assigned());
    }

    #[test]
    fn statistics_json_of_librdkafka_parses_with_unknown_fields_ignored() {
        let json = br#"{"name":"c#consumer-1","type":"consumer","brokers":{},
          "topics":{"t":{"topic":"t","partitions":{
            "0":{"partition":0,"fetch_state":"active","app_offset":7,"committed_offset":3,
                 "lo_offset":0,"hi_offset":9,"ls_offset":9,"consumer_lag":6},
            "-1":{"partition":-1,"fetch_state":"none","app_offset":-1001,"committed_offset":-1001,
                 "lo_offset":-1001,"hi_offset":-1001}}}}}"#;
        let stats: Stats = serde_json::from_slice(json).unwrap();
        let lags: Vec<_> = stats.topics["t"]
            .partitions
            .values()
            .filter(|p| p.assigned())
            .map(|p| (p.partition, p.lag()))
            .collect();
        assert_eq!(lags, [(0, Some(2))]);
    }
}
