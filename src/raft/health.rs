//! The storage health of a node: a fail-stop latch.
//!
//! After a failed write, fsync or rename the node can no longer tell what is
//! on its disk (after a failed fsync not even the page cache can be
//! trusted), so it must not acknowledge anything more. Whoever sees such an
//! error calls [`StorageHealth::fail`]; from then on the log store refuses
//! every write, readiness reports the reason, and the serving binary exits
//! non-zero so that a supervisor restarts it into recovery. The latch is
//! never cleared inside a process.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Debug)]
pub struct StorageHealth {
    failure: watch::Sender<Option<String>>,
}

impl StorageHealth {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            failure: watch::Sender::new(None),
        })
    }

    /// Latch a storage failure. The first reason wins; later ones are only
    /// logged.
    pub fn fail(&self, reason: impl std::fmt::Display) {
        let reason = reason.to_string();
        tracing::error!(%reason, "storage failed; this node acknowledges nothing more");
        self.failure.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// The latched failure, if any.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    pub fn is_failed(&self) -> bool {
        self.failure.borrow().is_some()
    }

    /// Resolves with the reason once storage failed.
    pub fn failed(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut rx = self.failure.subscribe();
        async move {
            let reason = rx
                .wait_for(|f| f.is_some())
                .await
                .map(|f| f.clone().unwrap_or_default());
            match reason {
                Ok(reason) => reason,
                // The sender lives as long as the node: never reached while
                // anyone waits.
                Err(_) => std::future::pending().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_failure_is_latched() {
        let h = StorageHealth::new();
        assert!(!h.is_failed());
        let waiter = tokio::spawn(h.failed());
        h.fail("fsync of raft.wal: EIO");
        h.fail("something later");
        assert_eq!(h.failure().as_deref(), Some("fsync of raft.wal: EIO"));
        assert_eq!(waiter.await.unwrap(), "fsync of raft.wal: EIO");
    }
}
