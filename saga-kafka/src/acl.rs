//! The ACLs a service needs, computed from what it registers.
//!
//! On a cluster with an authorizer and deny-by-default, each service's
//! principal needs exactly the bindings its workers use: the topics they
//! read and write, their consumer groups, their transactional ids. Those
//! follow from the saga definitions, participant policies and projections
//! the service registers, so [`AclPlan`] derives them from the same values,
//! and [`AclRecorder`] (a [`Runtime`] that runs nothing) records them from
//! the service's own wiring code:
//!
//! ```
//! use saga_core::{ParticipantPolicy, Runtime};
//! use saga_kafka::acl::{AclRecorder, AclOperation};
//! use saga_kafka::KafkaConfig;
//! # async fn example() -> Result<(), saga_core::SagaError> {
//! # struct Stock;
//! # #[async_trait::async_trait]
//! # impl saga_core::Participant for Stock {
//! #     type Command = serde_json::Value; type Reply = serde_json::Value; type Error = saga_core::StepError;
//! #     async fn handle(&self, c: serde_json::Value, _: &mut saga_core::ParticipantContext)
//! #         -> Result<serde_json::Value, saga_core::StepError> { Ok(c) }
//! # }
//! let config = KafkaConfig::new("kafka:9093").app("shop").create_topics(false);
//! let recorder = AclRecorder::new(&config);
//! // The service's own wiring, unchanged, against the recorder:
//! recorder
//!     .participant("inventory.requests", ParticipantPolicy::new("inventory"), Stock)
//!     .await?;
//! let mut plan = recorder.plan();
//! // What the wiring cannot show: the topics it writes to by name.
//! plan.writes(&["inventory.responses", "inventory.events"]);
//! print!("{}", plan.to_lines("User:inventory"));
//! assert!(plan
//!     .bindings()
//!     .iter()
//!     .any(|b| b.name == "inventory.requests" && b.operation == AclOperation::Read));
//! # Ok(()) }
//! ```
//!
//! Kafka lets READ and WRITE imply DESCRIBE, so no DESCRIBE binding is
//! listed where one of them is. IDEMPOTENT_WRITE on the cluster is not
//! listed: brokers since Kafka 2.8 let WRITE on a topic imply it (older
//! brokers need it added).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Mutex;

use async_trait::async_trait;
use saga_core::driver::{ledger_topic, state_topic, SagaService};
use saga_core::{
    DeadLetter, Envelope, Health, Operation, Page, Participant, ParticipantPolicy, Runtime,
    SagaData, SagaDefinition, SagaError, SagaHandle, SagaId, SagaInstance, SagaQuery,
};

use crate::config::KafkaConfig;
use crate::runtime::PUBLISH_SERVICE;

/// The kind of resource a binding is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum AclResource {
    /// A topic.
    Topic,
    /// A consumer group.
    Group,
    /// A producer's transactional id.
    TransactionalId,
    /// The cluster (name `kafka-cluster`).
    Cluster,
}

/// How a binding's name matches resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum AclPattern {
    /// The resource of exactly this name.
    Literal,
    /// Every resource whose name starts with this one.
    Prefixed,
}

/// What a binding allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum AclOperation {
    /// Consume a topic; join and commit in a group.
    Read,
    /// Produce to a topic; use a transactional id.
    Write,
    /// Create a topic.
    Create,
    /// Read a topic's configuration (the runtime checks compacted topics'
    /// `cleanup.policy`).
    DescribeConfigs,
    /// Idempotent produce, on the cluster (only brokers older than Kafka
    /// 2.8 need it: [`AclPlan::idempotent_write`]).
    IdempotentWrite,
}

impl AclResource {
    /// Kafka's name (`ResourceType` in the Java client).
    pub fn as_str(self) -> &'static str {
        match self {
            AclResource::Topic => "TOPIC",
            AclResource::Group => "GROUP",
            AclResource::TransactionalId => "TRANSACTIONAL_ID",
            AclResource::Cluster => "CLUSTER",
        }
    }
}

impl AclPattern {
    /// Kafka's name (`PatternType` in the Java client).
    pub fn as_str(self) -> &'static str {
        match self {
            AclPattern::Literal => "LITERAL",
            AclPattern::Prefixed => "PREFIXED",
        }
    }
}

impl AclOperation {
    /// Kafka's name (`AclOperation` in the Java client).
    pub fn as_str(self) -> &'static str {
        match self {
            AclOperation::Read => "READ",
            AclOperation::Write => "WRITE",
            AclOperation::Create => "CREATE",
            AclOperation::DescribeConfigs => "DESCRIBE_CONFIGS",
            AclOperation::IdempotentWrite => "IDEMPOTENT_WRITE",
        }
    }

    /// The `kafka-acls` option naming the operation.
    fn cli(self) -> &'static str {
        match self {
            AclOperation::Read => "Read",
            AclOperation::Write => "Write",
            AclOperation::Create => "Create",
            AclOperation::DescribeConfigs => "DescribeConfigs",
            AclOperation::IdempotentWrite => "IdempotentWrite",
        }
    }
}

/// One ALLOW binding for a principal (given when the plan is printed).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub struct AclBinding {
    /// The kind of resource.
    pub resource: AclResource,
    /// How [`name`](Self::name) matches.
    pub pattern: AclPattern,
    /// The resource's name, or its prefix.
    pub name: String,
    /// What is allowed.
    pub operation: AclOperation,
}

impl AclBinding {
    /// A binding.
    pub fn new(
        resource: AclResource,
        pattern: AclPattern,
        name: impl Into<String>,
        operation: AclOperation,
    ) -> Self {
        Self {
            resource,
            pattern,
            name: name.into(),
            operation,
        }
    }
}

/// `ALLOW <operation> <resource> <pattern> <name>`, the form of
/// [`AclPlan::to_lines`] without the principal.
impl fmt::Display for AclBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ALLOW {} {} {} {}",
            self.operation.as_str(),
            self.resource.as_str(),
            self.pattern.as_str(),
            self.name
        )
    }
}

/// The ACL bindings one service needs, built from what it registers.
///
/// Each method adds what one registration (or use) of the runtime needs
/// with the plan's [`KafkaConfig`]: its transactional-id prefix and app
/// name, and whether workers create their topics
/// ([`KafkaConfig::create_topics`]: CREATE on each).
#[derive(Clone, Debug)]
pub struct AclPlan {
    txn_prefix: String,
    reader_group: String,
    create_topics: bool,
    transactional: bool,
    bindings: BTreeSet<AclBinding>,
}

impl AclPlan {
    /// An empty plan for services run with `config`.
    pub fn new(config: &KafkaConfig) -> Self {
        Self {
            txn_prefix: config.transactional_id_base().to_owned(),
            reader_group: config.reader_group(),
            create_topics: config.create_topics,
            transactional: config.delivery_mode() == crate::DeliveryMode::ExactlyOnce,
            bindings: BTreeSet::new(),
        }
    }

    fn add(&mut self, resource: AclResource, pattern: AclPattern, name: &str, op: AclOperation) {
        self.bindings
            .insert(AclBinding::new(resource, pattern, name, op));
    }

    fn topic(&mut self, name: &str, op: AclOperation) {
        self.add(AclResource::Topic, AclPattern::Literal, name, op);
    }

    /// A compacted topic whose configuration the runtime checks (one
    /// it creates too, when it exists already).
    fn checked(&mut self, topic: &str) {
        self.topic(topic, AclOperation::DescribeConfigs);
    }

    /// Topics the runtime creates when the configuration says so.
    fn created(&mut self, names: &[String]) {
        if self.create_topics {
            for n in names {
                self.topic(n, AclOperation::Create);
            }
        }
    }

    /// A transactional producer of `service`: its transactional ids on
    /// every instance (`<prefix>-<service>-`, which also matches the ids of
    /// a service whose name starts with `<service>-`). At least once the
    /// producer is idempotent only and uses none.
    fn producer(&mut self, service: &str) {
        if !self.transactional {
            return;
        }
        let prefix = format!("{}-{service}-", self.txn_prefix);
        self.add(
            AclResource::TransactionalId,
            AclPattern::Prefixed,
            &prefix,
            AclOperation::Write,
        );
    }

    /// Restores read their topic with the reader group.
    fn reader(&mut self, topic: &str) {
        self.topic(topic, AclOperation::Read);
        let group = self.reader_group.clone();
        self.add(
            AclResource::Group,
            AclPattern::Literal,
            &group,
            AclOperation::Read,
        );
    }

    /// What [`Runtime::saga`] needs for `def`: Read on its reply topics
    /// and group `saga.<name>`; Read and Write on its state topic
    /// (restored with the reader group; DescribeConfigs too: it is
    /// checked); Write on its reply topic (starts and
    /// operator actions), command topics and dead-letter topics; its
    /// transactional ids (exactly once); Create on them all if topics are
    /// created. Event topics its steps emit to are not known from the
    /// definition: add them with [`AclPlan::writes`].
    pub fn saga<D: SagaData>(&mut self, def: &SagaDefinition<D>) -> &mut Self {
        let name = def.name();
        let state = state_topic(name);
        let replies = def.reply_channels();
        let mut created: Vec<String> = Vec::new();
        for r in &replies {
            self.topic(r, AclOperation::Read);
            created.push(r.clone());
        }
        self.topic(def.reply_channel(), AclOperation::Write);
        for c in def.command_channels() {
            self.topic(&c, AclOperation::Write);
            created.push(c);
        }
        let mut dead = vec![def.dead_letter_channel().to_owned()];
        dead.extend(
            def.steps()
                .iter()
                .filter_map(|s| s.own_dead_letter_channel().map(str::to_owned)),
        );
        for d in dead {
            self.topic(&d, AclOperation::Write);
            created.push(d);
        }
        self.reader(&state);
        self.topic(&state, AclOperation::Write);
        self.checked(&state);
        created.push(state);
        self.created(&created);
        self.add(
            AclResource::Group,
            AclPattern::Literal,
            &format!("saga.{name}"),
            AclOperation::Read,
        );
        self.producer(name);
        self
    }

    /// What [`Runtime::participant`] needs on command topic `channel`:
    /// Read on it and on group `policy.name`; Read and Write on its ledger
    /// (DescribeConfigs too: it is checked); Write on its
    /// dead-letter topic; its transactional ids (exactly once); Create on
    /// its topics if they are created. The
    /// topics it replies and emits to are named by the commands and the
    /// handler: add them with [`AclPlan::replies_to`] and
    /// [`AclPlan::writes`].
    pub fn participant(&mut self, channel: &str, policy: &ParticipantPolicy) -> &mut Self {
        let ledger = ledger_topic(&policy.name);
        self.topic(channel, AclOperation::Read);
        self.add(
            AclResource::Group,
            AclPattern::Literal,
            &policy.name,
            AclOperation::Read,
        );
        self.reader(&ledger);
        self.topic(&ledger, AclOperation::Write);
        self.checked(&ledger);
        self.topic(&policy.dead_letter_channel, AclOperation::Write);
        self.created(&[
            channel.to_owned(),
            ledger,
            policy.dead_letter_channel.clone(),
        ]);
        self.producer(&policy.name);
        self
    }

    /// Write on the reply topics of `def`'s steps that send commands to
    /// `channel`: what a participant on `channel` needs to answer that saga.
    pub fn replies_to<D: SagaData>(&mut self, channel: &str, def: &SagaDefinition<D>) -> &mut Self {
        for step in def.steps() {
            let actions = [
                (step.channel(), step.reply_channel()),
                (
                    step.compensation_channel(),
                    step.compensation_reply_channel(),
                ),
            ];
            for (to, reply) in actions {
                if to == Some(channel) {
                    self.topic(reply.unwrap_or(def.reply_channel()), AclOperation::Write);
                }
            }
        }
        self
    }

    /// What [`Runtime::projection`] needs: Read on `channels` and on its
    /// group (Create on the topics if they are created).
    pub fn projection(&mut self, group: &str, channels: &[&str]) -> &mut Self {
        self.projection_with(AclPattern::Literal, group, channels)
    }

    /// Like [`AclPlan::projection`] for a group whose name is generated
    /// per process (e.g. a fresh group so a projection kept in memory
    /// re-reads its topics): Read on every group whose name starts with
    /// `prefix`.
    pub fn projection_prefixed(&mut self, prefix: &str, channels: &[&str]) -> &mut Self {
        self.projection_with(AclPattern::Prefixed, prefix, channels)
    }

    fn projection_with(
        &mut self,
        pattern: AclPattern,
        group: &str,
        channels: &[&str],
    ) -> &mut Self {
        for c in channels {
            self.topic(c, AclOperation::Read);
        }
        self.created(&channels.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>());
        self.add(AclResource::Group, pattern, group, AclOperation::Read);
        self
    }

    /// What [`Runtime::publish`] needs to write to `topics`: Write on them
    /// and the publisher's transactional ids (exactly once).
    pub fn publisher(&mut self, topics: &[&str]) -> &mut Self {
        self.writes(topics);
        self.producer(PUBLISH_SERVICE);
        self
    }

    /// What [`Runtime::dead_letters`] needs to read `channel`.
    pub fn dead_letter_reader(&mut self, channel: &str) -> &mut Self {
        self.reader(channel);
        self
    }

    /// Write on `topics`: events a saga or participant emits, replies a
    /// participant sends.
    pub fn writes(&mut self, topics: &[&str]) -> &mut Self {
        for t in topics {
            self.topic(t, AclOperation::Write);
        }
        self
    }

    /// Create on `topics`: what [`ensure_topics`](crate::ensure_topics)
    /// needs for them.
    pub fn creates(&mut self, topics: &[&str]) -> &mut Self {
        for t in topics {
            self.topic(t, AclOperation::Create);
        }
        self
    }

    /// IdempotentWrite on the cluster, which brokers older than Kafka 2.8
    /// require of idempotent and transactional producers (newer ones let
    /// Write on a topic imply it).
    pub fn idempotent_write(&mut self) -> &mut Self {
        self.add(
            AclResource::Cluster,
            AclPattern::Literal,
            "kafka-cluster",
            AclOperation::IdempotentWrite,
        );
        self
    }

    /// Adds `other`'s bindings.
    pub fn merge(&mut self, other: &AclPlan) -> &mut Self {
        self.bindings.extend(other.bindings.iter().cloned());
        self
    }

    /// The bindings, sorted, each once.
    pub fn bindings(&self) -> Vec<AclBinding> {
        self.bindings.iter().cloned().collect()
    }

    /// One line per binding: `<principal> ALLOW <operation> <resource>
    /// <pattern> <name>` (Kafka's enum names; host `*`), for tools that
    /// apply bindings with an admin client.
    pub fn to_lines(&self, principal: &str) -> String {
        self.bindings
            .iter()
            .map(|b| format!("{principal} {b}\n"))
            .collect()
    }

    /// One `kafka-acls.sh --add` command per binding, for Kafka's own
    /// tool (`--bootstrap-server` and `--command-config` left to the
    /// variables `$BOOTSTRAP` and `$ADMIN_CONFIG`).
    pub fn to_kafka_acls(&self, principal: &str) -> String {
        let mut out = String::new();
        for b in &self.bindings {
            let resource = match b.resource {
                AclResource::Topic => format!("--topic '{}'", b.name),
                AclResource::Group => format!("--group '{}'", b.name),
                AclResource::TransactionalId => format!("--transactional-id '{}'", b.name),
                AclResource::Cluster => "--cluster".to_owned(),
            };
            let pattern = match b.pattern {
                AclPattern::Literal => "",
                AclPattern::Prefixed => " --resource-pattern-type prefixed",
            };
            out.push_str(&format!(
                "kafka-acls.sh --bootstrap-server \"$BOOTSTRAP\" --command-config \"$ADMIN_CONFIG\" --add --allow-principal '{principal}' --operation {} {resource}{pattern}\n",
                b.operation.cli()
            ));
        }
        out
    }
}

/// A [`Runtime`] that runs nothing and records what is registered on it
/// in an [`AclPlan`]: run a service's wiring against it to get the ACLs
/// the service needs on Kafka with the same configuration.
///
/// Registrations succeed; a saga handle's calls, [`Runtime::publish`] and
/// [`Runtime::dead_letters`] fail with [`SagaError::Runtime`] (nothing
/// runs). Projection groups are recorded literally unless
/// [`AclRecorder::generated_groups`] says they are prefixes.
#[derive(Debug)]
pub struct AclRecorder {
    plan: Mutex<AclPlan>,
    generated_groups: bool,
}

impl AclRecorder {
    /// A recorder for services run with `config`.
    pub fn new(config: &KafkaConfig) -> Self {
        Self {
            plan: Mutex::new(AclPlan::new(config)),
            generated_groups: false,
        }
    }

    /// Records projection groups as prefixes of the names used at run time
    /// (for wiring that appends a generated suffix to them): `group` is
    /// recorded as the prefix `group-`.
    pub fn generated_groups(mut self) -> Self {
        self.generated_groups = true;
        self
    }

    /// The plan recorded so far.
    pub fn plan(&self) -> AclPlan {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AclPlan> {
        self.plan.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn not_running(what: &str) -> SagaError {
    SagaError::Runtime {
        what: what.to_owned(),
        source: "the ACL recorder runs nothing".into(),
    }
}

struct Recorded<D: SagaData>(SagaDefinition<D>);

#[async_trait]
impl<D: SagaData> SagaService<D> for Recorded<D> {
    fn definition(&self) -> &SagaDefinition<D> {
        &self.0
    }

    async fn start(&self, _: SagaId, _: D) -> Result<SagaId, SagaError> {
        Err(not_running("starting a saga"))
    }

    async fn get(&self, _: &SagaId) -> Result<Option<SagaInstance<D>>, SagaError> {
        Err(not_running("reading a saga"))
    }

    async fn list(&self, _: &SagaQuery) -> Result<Page<SagaInstance<D>>, SagaError> {
        Err(not_running("listing sagas"))
    }

    async fn operate(&self, _: &SagaId, _: Operation) -> Result<(), SagaError> {
        Err(not_running("operating a saga"))
    }

    async fn wait_settled(
        &self,
        _: &SagaId,
        _: std::time::Duration,
    ) -> Result<SagaInstance<D>, SagaError> {
        Err(not_running("waiting for a saga"))
    }
}

#[async_trait]
impl Runtime for AclRecorder {
    fn name(&self) -> &'static str {
        "acl-recorder"
    }

    async fn saga<D: SagaData>(&self, def: SagaDefinition<D>) -> Result<SagaHandle<D>, SagaError> {
        self.lock().saga(&def);
        Ok(SagaHandle::new(Recorded(def)))
    }

    async fn participant<P: Participant>(
        &self,
        channel: &str,
        policy: ParticipantPolicy,
        _participant: P,
    ) -> Result<(), SagaError> {
        self.lock().participant(channel, &policy);
        Ok(())
    }

    async fn projection<F>(
        &self,
        group: &str,
        channels: &[&str],
        _handler: F,
    ) -> Result<(), SagaError>
    where
        F: FnMut(&Envelope) + Send + 'static,
    {
        if self.generated_groups {
            self.lock()
                .projection_prefixed(&format!("{group}-"), channels);
        } else {
            self.lock().projection(group, channels);
        }
        Ok(())
    }

    async fn publish(&self, _: Vec<Envelope>) -> Result<(), SagaError> {
        Err(not_running("publishing"))
    }

    async fn dead_letters(&self, _: &str) -> Result<Vec<DeadLetter>, SagaError> {
        Err(not_running("reading dead letters"))
    }

    fn health(&self) -> Health {
        Health::default()
    }

    async fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use saga_core::Step;
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, Default, Serialize, Deserialize)]
    struct Order;

    fn saga() -> SagaDefinition<Order> {
        SagaDefinition::<Order>::builder("order")
            .step(
                Step::remote("reserve", "inventory.requests")
                    .command(|_: &Order| "RESERVE")
                    .compensate_remote("inventory.requests", |_: &Order| "RELEASE")
                    .timeout(Duration::from_secs(5)),
            )
            .step(
                Step::remote("notify", "notifications.requests")
                    .command(|_: &Order| "MAIL")
                    .reply_to("notifications.responses"),
            )
            .build()
            .unwrap()
    }

    fn has(plan: &AclPlan, resource: AclResource, name: &str, op: AclOperation) -> bool {
        plan.bindings()
            .iter()
            .any(|b| b.resource == resource && b.name == name && b.operation == op)
    }

    #[test]
    fn a_saga_needs_its_topics_groups_and_transactional_ids() {
        let cfg = KafkaConfig::new("b:1").app("shop").create_topics(false);
        let mut plan = AclPlan::new(&cfg);
        plan.saga(&saga());
        let t = AclResource::Topic;
        assert!(has(&plan, t, "inventory.requests", AclOperation::Write));
        assert!(has(&plan, t, "notifications.requests", AclOperation::Write));
        assert!(has(&plan, t, "notifications.responses", AclOperation::Read));
        assert!(has(&plan, t, "order.state", AclOperation::Read));
        assert!(has(&plan, t, "order.state", AclOperation::Write));
        assert!(has(&plan, t, "order.state", AclOperation::DescribeConfigs));
        assert!(has(&plan, t, "order.dlq", AclOperation::Write));
        assert!(has(
            &plan,
            AclResource::Group,
            "saga.order",
            AclOperation::Read
        ));
        assert!(has(
            &plan,
            AclResource::Group,
            "shop-reader",
            AclOperation::Read
        ));
        assert!(plan
            .bindings()
            .iter()
            .any(|b| b.resource == AclResource::TransactionalId
                && b.pattern == AclPattern::Prefixed
                && b.name == "shop-order-"));
        assert!(
            !plan
                .bindings()
                .iter()
                .any(|b| b.operation == AclOperation::Create),
            "no CREATE when topics are not created"
        );
        let mut creating = AclPlan::new(&KafkaConfig::new("b:1").app("shop"));
        creating.saga(&saga());
        assert!(has(&creating, t, "order.state", AclOperation::Create));
        assert!(
            has(&creating, t, "order.state", AclOperation::DescribeConfigs),
            "checked when it exists already"
        );
        let alo = KafkaConfig::new("b:1").delivery(crate::DeliveryMode::AtLeastOnce);
        let mut alo_plan = AclPlan::new(&alo);
        alo_plan.saga(&saga());
        assert!(
            !alo_plan
                .bindings()
                .iter()
                .any(|b| b.resource == AclResource::TransactionalId),
            "at least once, no transactional id"
        );
    }

    #[test]
    fn a_participant_replies_on_the_topics_the_saga_names() {
        let cfg = KafkaConfig::new("b:1").create_topics(false);
        let mut plan = AclPlan::new(&cfg);
        plan.participant("notifications.requests", &ParticipantPolicy::new("mailer"))
            .replies_to("notifications.requests", &saga());
        let t = AclResource::Topic;
        assert!(has(&plan, t, "notifications.requests", AclOperation::Read));
        assert!(has(
            &plan,
            t,
            "notifications.responses",
            AclOperation::Write
        ));
        assert!(has(&plan, t, "mailer.ledger", AclOperation::Write));
        assert!(has(&plan, t, "mailer.dlq", AclOperation::Write));
        assert!(has(&plan, AclResource::Group, "mailer", AclOperation::Read));
        assert!(
            !has(&plan, t, "inventory.responses", AclOperation::Write),
            "only the replies of steps sending to its channel"
        );
    }

    #[test]
    fn printed_forms_name_the_principal_and_kafkas_enum_names() {
        let mut plan = AclPlan::new(&KafkaConfig::new("b:1").create_topics(false));
        plan.projection_prefixed("analytics-", &["orders.events"]);
        let lines = plan.to_lines("User:analytics");
        assert_eq!(
            lines,
            "User:analytics ALLOW READ TOPIC LITERAL orders.events\n\
             User:analytics ALLOW READ GROUP PREFIXED analytics-\n"
        );
        let cli = plan.to_kafka_acls("User:analytics");
        assert!(
            cli.contains("--group 'analytics-' --resource-pattern-type prefixed"),
            "{cli}"
        );
        assert_eq!(cli.lines().count(), 2);
    }

    #[tokio::test]
    async fn the_recorder_records_registrations_and_runs_nothing() {
        let cfg = KafkaConfig::new("b:1").create_topics(false);
        let rec = AclRecorder::new(&cfg).generated_groups();
        let handle = rec.saga(saga()).await.unwrap();
        rec.projection("timeline", &["orders.events"], |_| {})
            .await
            .unwrap();
        assert!(matches!(
            handle.start("o-1", Order).await,
            Err(SagaError::Runtime { .. })
        ));
        let plan = rec.plan();
        assert!(has(
            &plan,
            AclResource::Group,
            "saga.order",
            AclOperation::Read
        ));
        assert!(plan
            .bindings()
            .iter()
            .any(|b| b.resource == AclResource::Group
                && b.pattern == AclPattern::Prefixed
                && b.name == "timeline-"));
    }
}
