//! Topic administration: create the topics a saga, participant or
//! projection needs, idempotently.

use std::time::Duration;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;

use crate::aside::Aside;
use crate::config::KafkaConfig;
use crate::context::{client_error, denied, log, unauthenticated, Quiet};
use crate::error::{Error, Result};

/// What a topic is for, which decides its settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopicKind {
    /// Commands, replies and events: default retention.
    Messages,
    /// Saga state or participant ledgers: `cleanup.policy=compact`.
    Compacted,
    /// Dead letters: kept for the configured dead-letter retention (30 days by default).
    DeadLetters,
}

/// A topic to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSpec {
    /// The topic's name.
    pub name: String,
    /// Its kind.
    pub kind: TopicKind,
    /// Partitions (`None`: the configured default).
    pub partitions: Option<i32>,
}

impl TopicSpec {
    /// A message topic.
    pub fn messages(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: TopicKind::Messages,
            partitions: None,
        }
    }

    /// A compacted topic (state, ledgers).
    pub fn compacted(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: TopicKind::Compacted,
            partitions: None,
        }
    }

    /// A dead-letter topic.
    pub fn dead_letters(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: TopicKind::DeadLetters,
            partitions: None,
        }
    }

    /// Overrides the partition count.
    pub fn with_partitions(mut self, n: i32) -> Self {
        self.partitions = Some(n);
        self
    }
}

/// Creates `topics` with the configured partition count and replication
/// factor: compacted topics with `cleanup.policy=compact`, dead-letter topics
/// with `retention.ms` = the dead-letter retention. Topics that already exist
/// are left as they are.
///
/// # Errors
/// [`Error::Authentication`] if the cluster refuses the credentials or the
/// TLS handshake fails, [`Error::Authorization`] naming a topic the
/// principal may not create, [`Error::Client`] if the admin client cannot
/// be created or reach the cluster, [`Error::Topic`] naming a topic the
/// broker refused to create.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[TopicSpec]) -> Result<()> {
    let config = config.clone();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        preflight(&config)?;
        ensure_topics_blocking(&config, &topics).map(drop)
    })
    .await
    .map_err(|_| Error::Shutdown)?
}

/// Creates `topics`; returns the names of those that existed already.
pub(crate) fn ensure_topics_blocking(
    config: &KafkaConfig,
    topics: &[TopicSpec],
) -> Result<Vec<String>> {
    if topics.is_empty() {
        return Ok(Vec::new());
    }
    let admin: Aside<AdminClient<Quiet>> = config
        .admin_config()
        .create_with_context(Quiet)
        .map(Aside::new)
        .map_err(|e| Error::client("creating the admin client", e))?;
    let retention = config.dead_letter_retention.as_millis().to_string();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let n = NewTopic::new(
                &t.name,
                t.partitions.unwrap_or(config.partitions),
                TopicReplication::Fixed(config.replication_factor),
            );
            match t.kind {
                TopicKind::Messages => n,
                TopicKind::Compacted => n.set("cleanup.policy", "compact"),
                TopicKind::DeadLetters => n.set("retention.ms", &retention),
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = futures::executor::block_on(admin.create_topics(new.iter(), &opts))
        .map_err(|e| Error::client("creating topics", e))?;
    let mut existing = Vec::new();
    for r in results {
        match r {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => existing.push(name),
            Err((topic, code)) if denied(code).is_some() => {
                return Err(Error::Authorization {
                    principal: config.principal(),
                    operation: "CREATE".into(),
                    resource: format!("topic `{topic}`"),
                    reason: format!(
                        "{code} (create the topics as an admin and turn topic creation off, or grant CREATE)"
                    ),
                })
            }
            Err((topic, code)) => {
                return Err(Error::Topic {
                    topic,
                    reason: format!("cannot create it: {code}"),
                })
            }
        }
    }
    Ok(existing)
}

/// The partition count of each topic, from the cluster's metadata.
pub(crate) fn partition_counts(
    config: &KafkaConfig,
    topics: &[String],
) -> Result<Vec<(String, usize)>> {
    let c: Aside<BaseConsumer<Quiet>> = config
        .reader_config()
        .create_with_context(Quiet)
        .map(Aside::new)
        .map_err(|e| Error::client("creating a metadata client", e))?;
    let mut out = Vec::new();
    for t in topics {
        let mut last = None;
        // A topic just created may take a moment to show its partitions.
        for _ in 0..50 {
            let md = c
                .fetch_metadata(Some(t), Duration::from_secs(10))
                .map_err(|e| Error::client(format!("reading metadata of `{t}`"), e))?;
            let topic = md.topics().first();
            if let Some(code) = topic
                .and_then(|m| m.error())
                .map(RDKafkaErrorCode::from)
                .filter(|c| denied(*c).is_some())
            {
                return Err(Error::Authorization {
                    principal: config.principal(),
                    operation: "DESCRIBE (READ or WRITE)".into(),
                    resource: format!("topic `{t}`"),
                    reason: code.to_string(),
                });
            }
            let n = topic
                .filter(|m| m.error().is_none())
                .map(|m| m.partitions().len())
                .unwrap_or(0);
            if n > 0 {
                last = Some(n);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let n = last.ok_or_else(|| Error::Topic {
            topic: t.clone(),
            reason: "does not exist (create it, or enable `create_topics`)".into(),
        })?;
        out.push((t.clone(), n));
    }
    Ok(out)
}

/// Checks that `topics` all have the same partition count (co-partitioned
/// by saga id) and returns it.
pub(crate) fn check_copartitioned(config: &KafkaConfig, topics: &[String]) -> Result<usize> {
    let counts = partition_counts(config, topics)?;
    let first = counts[0].1;
    if let Some((t, n)) = counts.iter().find(|(_, n)| *n != first) {
        return Err(Error::Topic {
            topic: t.clone(),
            reason: format!(
                "has {n} partitions but `{}` has {first}: topics keyed by saga id must be co-partitioned",
                counts[0].0
            ),
        });
    }
    Ok(first)
}

/// The first authentication (or TLS) failure a client reports.
#[derive(Clone, Default)]
struct Probe {
    failure: Arc<Mutex<Option<String>>>,
}

impl ClientContext for Probe {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log(level, fac, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // A failed TLS handshake comes as a transport failure; its text
        // says what it is.
        let tls = reason.contains("SSL handshake failed");
        if tls || error.rdkafka_error_code().is_some_and(unauthenticated) {
            let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
            f.get_or_insert_with(|| reason.to_owned());
        }
        client_error(error, reason)
    }
}

impl ProducerContext for Probe {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// How long [`preflight`] waits for a first answer.
const PREFLIGHT: Duration = Duration::from_secs(10);

/// Connects once before any worker starts, so that wrong credentials or a
/// wrong CA fail the start within seconds, named as such, instead of
/// surfacing as a timeout of the first admin or transaction call. A
/// cluster that does not answer at all is not an error here (the calls
/// that follow wait for it, within their own bounds); the result says
/// whether it answered.
pub(crate) fn preflight(config: &KafkaConfig) -> Result<bool> {
    let probe = Probe::default();
    // A producer: a consumer with a group id would look for its group's
    // coordinator, which needs an ACL some services do not have.
    let c: Aside<BaseProducer<Probe>> = config
        .admin_config()
        .create_with_context(probe.clone())
        .map(Aside::new)
        .map_err(|e| Error::client("creating a client", e))?;
    let started = Instant::now();
    let failed = || {
        probe
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    };
    while started.elapsed() < PREFLIGHT {
        // An answer means this client is authenticated with the broker
        // that gave it: no need to wait for errors. (A failure towards
        // another broker of the list shows when a client first needs it.)
        let Err(e) = c.client().fetch_metadata(None, Duration::from_millis(300)) else {
            return Ok(true);
        };
        // Client errors reach the context only when the client is polled.
        c.poll(Duration::from_millis(50));
        if let Some(reason) = failed() {
            return Err(Error::Authentication {
                principal: config.principal(),
                reason,
            });
        }
        if e.rdkafka_error_code().is_some_and(unauthenticated) {
            return Err(Error::Authentication {
                principal: config.principal(),
                reason: e.to_string(),
            });
        }
    }
    tracing::warn!(bootstrap = config.bootstrap_servers(), waited = ?PREFLIGHT, "the Kafka cluster did not answer yet");
    Ok(false)
}

/// Checks that the compacted topics among `topics` are compacted, and not
/// also cleaned by age or size (`compact,delete` with a retention other
/// than `-1`): a state topic or ledger whose old records are deleted loses
/// sagas. A refused DescribeConfigs is an error (the ACL plan grants it),
/// except for a runtime that creates its topics: it skips the check with a
/// warning, as it may run with the ACLs of an earlier plan, which granted
/// DescribeConfigs only to runtimes that do not. A cluster that does not
/// answer in time only skips the check, with a warning.
pub(crate) fn verify_compacted(config: &KafkaConfig, topics: &[TopicSpec]) -> Result<()> {
    let denied_skips = config.create_topics;
    let compacted: Vec<&TopicSpec> = topics
        .iter()
        .filter(|t| t.kind == TopicKind::Compacted)
        .collect();
    if compacted.is_empty() {
        return Ok(());
    }
    let admin: Aside<AdminClient<Quiet>> = config
        .admin_config()
        .create_with_context(Quiet)
        .map(Aside::new)
        .map_err(|e| Error::client("creating the admin client", e))?;
    let specs: Vec<ResourceSpecifier<'_>> = compacted
        .iter()
        .map(|t| ResourceSpecifier::Topic(&t.name))
        .collect();
    // A broker answers in milliseconds; one that cannot (an old or mock
    // cluster) only costs this check, which is then skipped.
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(2)));
    let results = match futures::executor::block_on(admin.describe_configs(specs.iter(), &opts)) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the topics' configuration: their cleanup.policy is not checked");
            return Ok(());
        }
    };
    for (spec, r) in compacted.iter().zip(results) {
        match r {
            Ok(resource) => {
                let value = |key: &str| resource.get(key).and_then(|e| e.value.clone());
                let problem = not_kept(
                    &value("cleanup.policy").unwrap_or_default(),
                    value("retention.ms").as_deref(),
                    value("retention.bytes").as_deref(),
                );
                if let Some(reason) = problem {
                    return Err(Error::Topic {
                        topic: spec.name.clone(),
                        reason,
                    });
                }
            }
            Err(code) if denied(code).is_some() && denied_skips => {
                tracing::warn!(topic = %spec.name, error = %code, "cannot read the topic's configuration (grant DescribeConfigs on it, as AclPlan does): its cleanup.policy is not checked");
            }
            Err(code) if denied(code).is_some() => {
                return Err(Error::Authorization {
                    principal: config.principal(),
                    operation: "DESCRIBE_CONFIGS".into(),
                    resource: format!("topic `{}`", spec.name),
                    reason: code.to_string(),
                })
            }
            // A missing topic is reported next, with the partition check.
            Err(code) => {
                tracing::warn!(topic = %spec.name, error = %code, "cannot read the topic's configuration: its cleanup.policy is not checked");
            }
        }
    }
    Ok(())
}

/// Why a compacted topic with these settings would not keep each key's
/// latest record for as long as it is needed, if it would not: it is not
/// compacted, or it also deletes by age or size (`compact,delete` with a
/// `retention.ms` or `retention.bytes` other than `-1`), which loses the
/// state of a saga parked longer than that.
fn not_kept(
    policy: &str,
    retention_ms: Option<&str>,
    retention_bytes: Option<&str>,
) -> Option<String> {
    let has = |p: &str| policy.split(',').any(|q| q.trim() == p);
    if !has("compact") {
        return Some(format!(
            "has cleanup.policy={policy}: a state topic or ledger must be compacted (cleanup.policy=compact)"
        ));
    }
    if !has("delete") {
        return None;
    }
    let limited = |v: Option<&str>| v.is_some_and(|v| v.trim() != "-1");
    let limit = if limited(retention_ms) {
        format!("retention.ms={}", retention_ms.unwrap_or_default())
    } else if limited(retention_bytes) {
        format!("retention.bytes={}", retention_bytes.unwrap_or_default())
    } else {
        return None;
    };
    Some(format!(
        "has cleanup.policy={policy} with {limit}: records past that limit are deleted, \
         latest ones included (the state of a saga parked longer than that would be lost); \
         a state topic or ledger must be compacted only (cleanup.policy=compact), \
         or keep retention.ms and retention.bytes at -1"
    ))
}

#[cfg(test)]
mod tests {
    use super::not_kept;

    #[test]
    fn a_compacted_topic_that_also_deletes_by_age_or_size_is_refused() {
        assert_eq!(not_kept("compact", Some("604800000"), Some("-1")), None);
        assert_eq!(not_kept("compact,delete", Some("-1"), Some("-1")), None);
        assert_eq!(not_kept("delete,compact", Some("-1"), None), None);
        let by_age = not_kept("compact,delete", Some("604800000"), Some("-1")).unwrap();
        assert!(by_age.contains("retention.ms=604800000"), "{by_age}");
        let by_size = not_kept("compact, delete", Some("-1"), Some("1073741824")).unwrap();
        assert!(by_size.contains("retention.bytes=1073741824"), "{by_size}");
        let not_compacted = not_kept("delete", Some("-1"), Some("-1")).unwrap();
        assert!(
            not_compacted.contains("must be compacted"),
            "{not_compacted}"
        );
        assert!(not_kept("", None, None).is_some());
        // Retentions the broker did not describe are not assumed limited.
        assert_eq!(not_kept("compact,delete", None, None), None);
    }
}
