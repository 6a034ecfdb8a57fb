//! Saga orchestration for Rust.
//!
//! This facade re-exports [`saga_core`] (the transport-agnostic engine and its
//! in-memory runtime) and, with the `kafka` feature (on by default),
//! [`saga_kafka`] as [`kafka`].
#![deny(missing_docs)]

pub use saga_core::*;

/// The Kafka runtime (enabled by the `kafka` feature).
#[cfg(feature = "kafka")]
pub use saga_kafka as kafka;
