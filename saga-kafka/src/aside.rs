//! Short-lived clients closed off the caller's thread.
//!
//! rdkafka closes some clients by polling with a fixed 100 ms timeout that
//! it waits out: a consumer in a group (its close), an admin client (its
//! polling thread). A restore, or a runtime registering a saga, used to
//! wait for each client it made and dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// At most this many clients close aside at once; others close in place
/// (a broker out of reach can make closes slow: they must not pile up).
const MAX_CLOSING: usize = 16;

/// Clients being closed aside, in this process.
static CLOSING: AtomicUsize = AtomicUsize::new(0);

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

/// Counts a close in flight until dropped.
struct Closing;

impl Drop for Closing {
    fn drop(&mut self) {
        CLOSING.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<T: Send + 'static> Drop for Aside<T> {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else { return };
        if CLOSING.fetch_add(1, Ordering::AcqRel) >= MAX_CLOSING {
            CLOSING.fetch_sub(1, Ordering::AcqRel);
            drop(client);
            return;
        }
        let closing = Closing;
        // If no thread can be started, the closure is dropped here, and
        // the client with it: closed in place.
        let _ = std::thread::Builder::new()
            .name("saga-kafka-close".into())
            .spawn(move || {
                drop(client);
                drop(closing);
            });
    }
}

/// Waits until no client is being closed aside, for at most `limit`
/// (a runtime shutting down lets them finish before the process exits).
pub(crate) async fn closed(limit: Duration) {
    let deadline = Instant::now() + limit;
    while CLOSING.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Waits (at most 10 s) for a go before it is dropped, then says
    /// whether it got one, and on which thread.
    struct Slow {
        go: mpsc::Receiver<()>,
        done: mpsc::Sender<(bool, Option<String>)>,
    }

    impl Drop for Slow {
        fn drop(&mut self) {
            let went = self.go.recv_timeout(Duration::from_secs(10)).is_ok();
            let name = std::thread::current().name().map(str::to_owned);
            let _ = self.done.send((went, name));
        }
    }

    #[tokio::test]
    async fn a_client_set_aside_is_dropped_on_another_thread_without_waiting() {
        let (go, go_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let aside = Aside::new(Slow {
            go: go_rx,
            done: done_tx,
        });
        // Dropped in place, the drop would wait for a go sent after it.
        drop(aside);
        go.send(()).unwrap();
        let (went, name) = done.recv_timeout(Duration::from_secs(20)).unwrap();
        assert!(went, "the drop waited for the client to close");
        assert_eq!(name.as_deref(), Some("saga-kafka-close"));
        closed(Duration::from_secs(5)).await;
        assert_eq!(
            CLOSING.load(Ordering::Acquire),
            0,
            "the close is counted until it ends"
        );
    }
}
