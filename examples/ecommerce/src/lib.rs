//! The e-commerce example system, built on `saga-core` and `saga-kafka`: an
//! order saga over inventory and notification participants, an analytics
//! projection and a DLQ processor (see the repository's README,
//! "Walkthrough").
//!
//! ```text
//! cargo run --example ecommerce                      # the demo: the seed's three flows, in memory
//! cargo run --example ecommerce -- serve             # the HTTP API on 127.0.0.1:8080, in memory
//! cargo run --example ecommerce -- serve --kafka localhost:9092   # the same system on Kafka
//! ECOMMERCE_API_TOKEN=… cargo run --example ecommerce -- dlq list   # operate the DLQ of a running `serve`
//!
//! # one process per service (Kafka: --kafka HOST:PORT, before or after the
//! # command, else KAFKA_BOOTSTRAP_SERVERS)
//! cargo run --example ecommerce -- order        --instance-id order-1   # orders API, :8080
//! cargo run --example ecommerce -- inventory    --instance-id inv-1     # :8081
//! cargo run --example ecommerce -- inventory    --instance-id inv-2 --addr 127.0.0.1:8091
//! cargo run --example ecommerce -- notification --instance-id notif-1   # :8082
//! cargo run --example ecommerce -- analytics    --instance-id an-1      # :8083
//! cargo run --example ecommerce -- dlq          --instance-id dlq-1     # :8084
//! ```
//!
//! The modules follow the services: [`order`] (the saga), [`inventory`] and
//! [`notification`] (participants), [`analytics`] (a projection), [`dlq`]
//! (the dead-letter processor); [`messages`] holds the contracts between
//! them; [`system`] wires them on a runtime (in memory or on Kafka, once,
//! through saga-core's `Runtime`); [`http`] is the API, [`auth`] who may
//! call it (bearer tokens by role) and [`ui`] the operators' web page, [`demo`] the embedded demo and [`cli`]
//! the command line; [`telemetry`] sets up logs and (feature `otel`) OTLP
//! span export.

pub mod analytics;
pub mod auth;
pub mod cli;
pub mod demo;
pub mod dlq;
pub mod dlq_client;
pub mod http;
pub mod inventory;
pub mod messages;
pub mod notification;
pub mod order;
pub mod sagas_client;
pub mod system;
pub mod telemetry;
pub mod timeline;
pub mod ui;
