//! The embedded in-memory runtime (feature `memory`, on by default): the
//! default for examples and the test double for users' sagas.
//!
//! A [`MemoryBackend`] holds what survives a "crash": channels split into
//! partitions like Kafka topics, consumer-group offsets, and the compacted
//! tables of saga state and participant ledgers. An [`InMemoryRuntime`]
//! runs the same drivers as the Kafka runtime over it.

mod backend;
mod clock;
mod runtime;
mod worker;

pub use backend::{MemoryBackend, DEFAULT_PARTITIONS};
pub use clock::Clock;
pub use runtime::InMemoryRuntime;
