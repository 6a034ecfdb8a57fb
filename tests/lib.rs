//! Cross-crate integration tests (this package has no library code). Each
//! test body is written once against saga-core's `Runtime` API and run on
//! the in-memory runtime and on a real Kafka broker.
