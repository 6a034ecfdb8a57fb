//! Short-lived clients closed off the caller's thread.
//!
//! rdkafka closes some clients by polling with a fixed 100 ms timeout that
//! it waits out: a consumer in a group (its close), an admin client (its
//! polling thread). A restore, or a runtime registering a saga, used to
//! wait for each client it made and dropped.

/// A client dropped on a thread of its own: whoever drops it does not
/// wait for it to close.
pub(crate) struct Aside<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> Aside<T> {
    pub(crate) fn new(client: T) -> Self {
        Self(Some(client))
    }
}

impl<T: Send + 'static> std::ops::Deref for Aside<T> {
    type Target = T;

    fn deref(&self) -> &T {
        match &self.0 {
            Some(client) => client,
            // Taken only in `drop`.
            None => unreachable!("a client set aside is there until it is dropped"),
        }
    }
}

impl<T: Send + 'static> Drop for Aside<T> {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            // If no thread can be started, the closure is dropped here,
            // and the client with it: closed in place.
            let _ = std::thread::Builder::new()
                .name("saga-kafka-close".into())
                .spawn(move || drop(client));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Sends its thread's name when dropped, after a pause.
    struct Slow(mpsc::Sender<Option<String>>);

    impl Drop for Slow {
        fn drop(&mut self) {
            std::thread::sleep(Duration::from_millis(200));
            let _ = self
                .0
                .send(std::thread::current().name().map(str::to_owned));
        }
    }

    #[test]
    fn a_client_set_aside_is_dropped_on_another_thread_without_waiting() {
        let (tx, rx) = mpsc::channel();
        let aside = Aside::new(Slow(tx));
        let started = std::time::Instant::now();
        drop(aside);
        assert!(
            started.elapsed() < Duration::from_millis(150),
            "the drop waited"
        );
        let name = rx.recv_timeout(Duration::from_secs(5)).expect("dropped");
        assert_eq!(name.as_deref(), Some("saga-kafka-close"));
    }
}
