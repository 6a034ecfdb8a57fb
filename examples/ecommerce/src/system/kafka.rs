//! The system on Kafka: any subset of the services per process.

use std::sync::Arc;

use saga_core::driver::{ledger_topic, state_topic};
use saga_core::{Clock, ParticipantPolicy, SagaError};
use saga_kafka::acl::{AclPlan, AclRecorder};
use saga_kafka::{KafkaConfig, KafkaRuntime, TopicSpec};

use crate::messages::{
    ALL_CHANNELS, INVENTORY_EVENTS, INVENTORY_REQUESTS, NOTIFICATIONS_EVENTS,
    NOTIFICATIONS_REQUESTS, ORDERS_EVENTS,
};
use crate::notification;
use crate::order;
use crate::system::wiring::{wire, Options};
use crate::system::{Config, Observer, System};

/// Every topic the system uses on Kafka, with its kind: the design's
/// channels, and the runtime's own for the order saga (its state, replies
/// and dead letters) and the participants (ledgers, dead letters). What to
/// provision beforehand when [`Config::create_topics`] is off.
///
/// # Errors
/// If the order saga's definition is invalid.
pub fn kafka_topics(config: &Config) -> Result<Vec<TopicSpec>, SagaError> {
    let topics = &config.topics;
    let saga = order::saga(&config.order, topics)?;
    let participants = [
        ParticipantPolicy::new(topics.name("inventory")),
        notification::policy(&config.notification, topics),
    ];
    let dead_letters: Vec<String> = participants
        .iter()
        .map(|p| p.dead_letter_channel.clone())
        .chain([saga.dead_letter_channel().to_owned()])
        .chain(
            saga.steps()
                .iter()
                .filter_map(|s| s.own_dead_letter_channel().map(str::to_owned)),
        )
        .collect();
    let mut specs: Vec<TopicSpec> = Vec::new();
    let mut add = |spec: TopicSpec| {
        if !specs.iter().any(|s| s.name == spec.name) {
            specs.push(spec);
        }
    };
    for name in topics
        .names(ALL_CHANNELS)
        .into_iter()
        .chain(saga.reply_channels())
        .chain(saga.command_channels())
        .chain(dead_letters.iter().cloned())
    {
        add(if dead_letters.contains(&name) {
            TopicSpec::dead_letters(name)
        } else {
            TopicSpec::messages(name)
        });
    }
    add(TopicSpec::compacted(state_topic(saga.name())));
    for p in &participants {
        add(TopicSpec::compacted(ledger_topic(&p.name)));
    }
    Ok(specs)
}

/// The Kafka configuration: the environment (`KafkaConfig::from_env`:
/// security, delivery mode …) with `bootstrap`, and the app name, instance
/// id and partitions of `config` when set.
///
/// # Errors
/// What is wrong with the environment or `config`.
pub fn kafka_config(config: &Config, bootstrap: &str) -> Result<KafkaConfig, String> {
    let mut cfg = KafkaConfig::from_lookup(|key| match key {
        "KAFKA_BOOTSTRAP_SERVERS" => Some(bootstrap.to_owned()),
        _ => std::env::var(key).ok().filter(|v| !v.is_empty()),
    })
    .map_err(|e| e.to_string())?;
    if let Some(app) = &config.app {
        cfg = cfg.app(app.clone());
    }
    if let Some(id) = &config.instance_id {
        cfg = cfg.instance_id(id.clone());
    }
    let partitions = i32::try_from(config.partitions)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("invalid partition count {}", config.partitions))?;
    Ok(cfg.partitions(partitions))
}

/// The ACL bindings the one service of `config.services` needs on Kafka
/// with `kcfg`: recorded from the service's own wiring (the same code that
/// registers it), plus the topics it writes to by name (events, replies to
/// the order saga, the DLQ processor's redrives), and CREATE on every
/// topic of the system when processes create them ([`Config::create_topics`]).
///
/// # Errors
/// If the wiring fails (an invalid definition) or `config.services` is
/// not one service.
pub async fn acl_plan(config: &Config, kcfg: &KafkaConfig) -> Result<AclPlan, String> {
    let names = config.services.names();
    let [name] = names.as_slice() else {
        return Err(format!(
            "ACLs are per service: name one, not {}",
            names.join(", ")
        ));
    };
    let kcfg = kcfg.clone().create_topics(config.create_topics);
    let recorder = Arc::new(AclRecorder::new(&kcfg).generated_groups());
    let opts = Options {
        services: config.services,
        sharded_inventory: true,
        // Recorded as prefixes: processes add a generated suffix.
        fresh_groups: false,
        clock: Clock::system(),
    };
    wire(recorder.clone(), config, opts, Observer::Kafka).await?;
    let mut plan = recorder.plan();
    let topics = &config.topics;
    let saga = order::saga(&config.order, topics).map_err(|e| e.to_string())?;
    match *name {
        "order" => {
            // Its steps' events, and NOTIFICATION_FAILED when the email
            // step gives up.
            plan.writes(&[
                &topics.name(ORDERS_EVENTS),
                &topics.name(NOTIFICATIONS_EVENTS),
            ]);
        }
        "inventory" => {
            plan.replies_to(&topics.name(INVENTORY_REQUESTS), &saga)
                .writes(&[&topics.name(INVENTORY_EVENTS)]);
        }
        "notification" => {
            plan.replies_to(&topics.name(NOTIFICATIONS_REQUESTS), &saga)
                .writes(&[&topics.name(NOTIFICATIONS_EVENTS)]);
        }
        "dlq" => {
            // Redrives go back to the command topics dead letters came
            // from; the SMS fallback reports on the notification events.
            let commands = saga.command_channels();
            let mut targets: Vec<&str> = commands.iter().map(String::as_str).collect();
            let events = topics.name(NOTIFICATIONS_EVENTS);
            targets.push(&events);
            plan.publisher(&targets);
        }
        _ => {}
    }
    if config.create_topics {
        let specs = kafka_topics(config).map_err(|e| e.to_string())?;
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        plan.creates(&names);
    }
    Ok(plan)
}

/// Creates every topic of the system (what an admin runs once when the
/// services run with topic creation off).
///
/// # Errors
/// What the cluster refused, named.
pub async fn create_topics(config: &Config, kcfg: &KafkaConfig) -> Result<Vec<TopicSpec>, String> {
    let specs = kafka_topics(config).map_err(|e| e.to_string())?;
    saga_kafka::ensure_topics(kcfg, &specs)
        .await
        .map_err(|e| format!("cannot create the topics: {e}"))?;
    Ok(specs)
}

/// Starts `config.services` on Kafka at `bootstrap`.
pub(crate) async fn start(config: Config, bootstrap: &str) -> Result<System, String> {
    let kcfg = kafka_config(&config, bootstrap)?;
    start_with(config, kcfg).await
}

/// Starts `config.services` on Kafka with `kcfg`.
pub(crate) async fn start_with(config: Config, kcfg: KafkaConfig) -> Result<System, String> {
    let kcfg = kcfg.create_topics(config.create_topics);
    // Every topic of the system, made up front with its kind: the
    // dead-letter topics keep their messages 30 days, created as such
    // before any projection could create them as plain topics.
    if config.create_topics {
        let specs = kafka_topics(&config).map_err(|e| e.to_string())?;
        saga_kafka::ensure_topics(&kcfg, &specs)
            .await
            .map_err(|e| format!("cannot create the topics: {e}"))?;
    }
    let runtime = Arc::new(KafkaRuntime::new(kcfg).map_err(|e| e.to_string())?);
    let opts = Options {
        services: config.services,
        sharded_inventory: true,
        fresh_groups: true,
        clock: Clock::system(),
    };
    let system = wire(runtime, &config, opts, Observer::Kafka).await?;
    tracing::info!(services = ?config.services.names(), prefix = config.topics.prefix(), "services on Kafka started");
    Ok(system)
}
