//! The in-memory runtime's clock: wall time that follows tokio's clock.

use crate::ids::Timestamp;

/// Virtual-time-friendly wall clock: wall time at creation plus the tokio
/// clock's elapsed time since.
///
/// Under `tokio::time::pause()` it advances only with tokio's virtual time,
/// so tests of backoffs and timeouts never sleep for real. Share one clock
/// (copy it) across runtime restarts so persisted timers keep their meaning.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin_wall: Timestamp,
    origin: tokio::time::Instant,
}

impl Clock {
    /// Starts at the system's wall time.
    pub fn system() -> Self {
        Self::starting_at(Timestamp::now())
    }

    /// Starts at `wall` (e.g. a fixed time in tests).
    pub fn starting_at(wall: Timestamp) -> Self {
        Self {
            origin_wall: wall,
            origin: tokio::time::Instant::now(),
        }
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        self.origin_wall.saturating_add(self.origin.elapsed())
    }

    /// The tokio instant at which wall time `at` is reached.
    pub fn instant_at(&self, at: Timestamp) -> tokio::time::Instant {
        self.origin + at.saturating_since(self.origin_wall)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}
