//! Waiting for a saga to settle, for runtimes' `SagaService::wait_settled`.

use std::future::Future;
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::SagaError;
use crate::ids::SagaId;
use crate::instance::SagaInstance;

/// Waits until `load` returns saga `id` completed, compensated or parked,
/// for at most `timeout` (tokio time). It loads again whenever `changed` is
/// notified (the runtime notifies it when it commits) and every 100 ms.
///
/// # Errors
/// [`SagaError::WaitTimeout`] after `timeout`; what `load` returns (e.g.
/// [`SagaError::Shutdown`]).
pub async fn wait_settled<D, F, Fut>(
    id: &SagaId,
    timeout: Duration,
    changed: &Notify,
    mut load: F,
) -> Result<SagaInstance<D>, SagaError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<SagaInstance<D>>, SagaError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(i) = load().await? {
            if i.status.is_settled() {
                return Ok(i);
            }
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Err(SagaError::WaitTimeout { saga_id: id.clone() });
            }
        }
    }
}
