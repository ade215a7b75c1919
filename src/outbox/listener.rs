//! The NOTIFY wake-up: a LISTEN connection that pokes the relay when the insert trigger fires.
//!
//! NOTIFY is only a hint. Notifications sent while the listener is disconnected are lost,
//! so the relay still polls, and every (re)connection wakes the relay once to cover the gap.

use std::sync::Arc;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::RECONNECT;
use crate::retry::sleep_or_cancel;

/// Listens on `channel` until `shutdown`, waking `wake` on every notification.
pub async fn run(
    outbox: String,
    pool: PgPool,
    channel: String,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = listener => match result {
                Ok(listener) => listener,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay = RECONNECT.delay(failures);
                    tracing::warn!(outbox = %outbox, channel = %channel, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "cannot LISTEN for outbox notifications; polling meanwhile");
                    if sleep_or_cancel(delay, &shutdown).await {
                        return;
                    }
                    continue;
                }
            },
        };
        if failures > 0 {
            tracing::info!(outbox = %outbox, channel = %channel, "listening for outbox notifications again");
        }
        failures = 0;
        wake.notify_one();
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => return,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(_)) => wake.notify_one(),
                // The connection dropped. Rebuild it here rather than inside `try_recv`, so
                // the wake-up after the new LISTEN covers what was sent in between.
                Ok(None) => {
                    tracing::warn!(outbox = %outbox, channel = %channel, "LISTEN connection lost; reconnecting");
                    wake.notify_one();
                    break;
                }
                Err(e) => {
                    tracing::warn!(outbox = %outbox, channel = %channel, error = %e, "LISTEN connection failed; reconnecting");
                    wake.notify_one();
                    failures = 1;
                    if sleep_or_cancel(RECONNECT.delay(failures), &shutdown).await {
                        return;
                    }
                    break;
                }
            }
        }
    }
}
