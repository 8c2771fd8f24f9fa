//! Cluster mode's side of the executor: firings this member may not act on yet.
//!
//! In cluster mode every member evaluates the whole stream, so every member derives every
//! firing; only the holder of the firing's partition (see `crate::cluster`) acts on it, after
//! claiming it create-only in the claims bucket. A member *parks* the firings of partitions it
//! does not hold. Each renewal round it reviews them: a firing whose partition it now holds is
//! claimed and acted on here (the old holder died before claiming it); one parked for a lease
//! or longer is looked up in the claims, and dropped once another member holds its claim.
//! Nothing parked is lost on a restart: it stays undispatched in the store, and the next start
//! dispatches it again.

use tracing::debug;
use uuid::Uuid;

use super::Executor;
use crate::pipeline::Dispatch;

/// A firing parked in cluster mode, and since when it was last looked at.
#[derive(Debug)]
pub(super) struct Parked {
    pub(super) dispatch: Dispatch,
    pub(super) since: std::time::Instant,
}

impl Executor {
    /// Cluster mode: act only on the firings of partitions `cluster` holds; park the others
    /// (see [`Executor::review_parked`]). Needs [`Executor::set_shared`] for the claims.
    pub fn set_cluster(&self, cluster: crate::cluster::Cluster) {
        let _ = self.inner.cluster.set(cluster);
    }

    /// This member's cluster, in cluster mode.
    pub fn cluster(&self) -> Option<&crate::cluster::Cluster> {
        self.inner.cluster.get()
    }

    /// How many firings wait for another member's claim (cluster mode).
    pub fn parked_count(&self) -> usize {
        self.inner.parked.lock().map_or(0, |p| p.len())
    }

    /// Cluster mode: every renewal round, looks at the parked firings. One whose partition
    /// this member now holds is claimed and acted on here (its old holder died before
    /// claiming it). One parked for a lease or longer is looked up in the claims: claimed by
    /// another member → done with (marked dispatched here); claimed by this member (before a
    /// restart) → finished here; unclaimed → looked at again a lease later. Ends with
    /// `shutdown`; what is still parked stays undispatched in the store for the next start.
    pub async fn review_parked(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        use futures_util::StreamExt;
        let (Some(cluster), Some((shared, me, _))) =
            (self.inner.cluster.get(), self.inner.shared.get())
        else {
            return;
        };
        let lease = cluster.config().lease;
        let mut ticker = tokio::time::interval(cluster.config().renew_every());
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            let (ours, due): (Vec<Dispatch>, Vec<Uuid>) = {
                let Ok(mut parked) = self.inner.parked.lock() else {
                    return;
                };
                let ours: Vec<Uuid> = parked
                    .iter()
                    .filter(|(_, p)| cluster.owns(p.dispatch.firing.automation.id))
                    .map(|(id, _)| *id)
                    .collect();
                let ours = ours
                    .into_iter()
                    .filter_map(|id| parked.remove(&id).map(|p| p.dispatch))
                    .collect();
                let due = parked
                    .iter()
                    .filter(|(_, p)| p.since.elapsed() >= lease)
                    .map(|(id, _)| *id)
                    .collect();
                (ours, due)
            };
            for d in ours {
                let executor = self.clone();
                tokio::spawn(async move { executor.dispatch_claiming(d, true).await });
            }
            let holders: Vec<(Uuid, Option<Uuid>)> = futures_util::stream::iter(due)
                .map(|firing| async move { (firing, shared.holder(firing).await) })
                .buffer_unordered(64)
                .collect()
                .await;
            for (firing, holder) in holders {
                let Ok(mut parked) = self.inner.parked.lock() else {
                    return;
                };
                match holder {
                    None => {
                        if let Some(p) = parked.get_mut(&firing) {
                            p.since = std::time::Instant::now();
                        }
                    }
                    Some(holder) => {
                        let Some(p) = parked.remove(&firing) else {
                            continue;
                        };
                        drop(parked);
                        if holder == *me {
                            // Claimed here before a restart: finish what was started.
                            let executor = self.clone();
                            tokio::spawn(async move { executor.act_on(p.dispatch).await });
                        } else {
                            debug!(%firing, %holder, "cluster: another member acted on this firing");
                            self.mark_dispatched(firing);
                        }
                    }
                }
            }
        }
    }

    /// Cluster mode: keeps a firing of a partition this member does not hold.
    pub(super) fn park(&self, d: Dispatch) {
        if let Ok(mut parked) = self.inner.parked.lock() {
            parked.insert(
                d.firing.id,
                Parked {
                    dispatch: d,
                    since: std::time::Instant::now(),
                },
            );
        }
    }
}
