//! Topic administration: create the topics a saga, participant or
//! projection needs, idempotently.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::context::Quiet;
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
/// [`Error::Client`] if the admin client cannot be created or reach the
/// cluster, [`Error::Topic`] naming a topic the broker refused to create.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[TopicSpec]) -> Result<()> {
    let config = config.clone();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || ensure_topics_blocking(&config, &topics))
        .await
        .map_err(|_| Error::Shutdown)?
}

pub(crate) fn ensure_topics_blocking(config: &KafkaConfig, topics: &[TopicSpec]) -> Result<()> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<Quiet> = config
        .admin_config()
        .create_with_context(Quiet)
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
    for r in results {
        match r {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::Topic {
                    topic,
                    reason: format!("cannot create it: {code}"),
                })
            }
        }
    }
    Ok(())
}

/// The partition count of each topic, from the cluster's metadata.
pub(crate) fn partition_counts(
    config: &KafkaConfig,
    topics: &[String],
) -> Result<Vec<(String, usize)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer<Quiet> = config
        .reader_config()
        .create_with_context(Quiet)
        .map_err(|e| Error::client("creating a metadata client", e))?;
    let mut out = Vec::new();
    for t in topics {
        let mut last = None;
        // A topic just created may take a moment to show its partitions.
        for _ in 0..50 {
            let md = c
                .fetch_metadata(Some(t), Duration::from_secs(10))
                .map_err(|e| Error::client(format!("reading metadata of `{t}`"), e))?;
            let n = md
                .topics()
                .first()
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
