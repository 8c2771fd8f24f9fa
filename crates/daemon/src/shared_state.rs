//! Trigger state in JetStream when NATS is configured, so another instance can take over.
//!
//! * Every checkpoint (engine snapshot + the local log position) is also stored in the
//!   object store `SPUR_STATE`; a daemon that starts with an empty data folder restores from
//!   it. The NATS consumer acknowledges a message only once a stored checkpoint covers it, so
//!   everything after that checkpoint is still in the `SPUR_EVENTS` stream and is redelivered
//!   to the successor: nothing is lost.
//! * Before the actions of a firing run, its id is claimed in the KV bucket `SPUR_FIRINGS`
//!   (create-only): a successor that derives the same firing again does not repeat them.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use uuid::Uuid;

const STATE_BUCKET: &str = "SPUR_STATE";
const CLAIMS_BUCKET: &str = "SPUR_FIRINGS";
const CHECKPOINT: &str = "checkpoint";

/// The least time between two checkpoint uploads. JetStream acknowledgements wait for an
/// upload that covers them, so this (plus the pipeline's checkpoint interval) is how far
/// acknowledgements lag under load; `max_ack_pending` leaves room for that.
pub const MIRROR_INTERVAL: Duration = Duration::from_millis(500);

/// Handles to the JetStream buckets.
#[derive(Clone)]
pub struct SharedState {
    objects: object_store::ObjectStore,
    claims: kv::Store,
    /// The checkpoint object's name: `checkpoint`, or `checkpoint-<cluster>` in cluster mode.
    checkpoint: String,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedState")
    }
}

/// What claiming a firing found (see [`SharedState::try_claim`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This instance holds the claim: it acts.
    Ours,
    /// Another instance does: it acts, this one does not.
    Theirs,
    /// JetStream could not say (unreachable, a leader election): ask again later.
    Unknown,
}

/// The latest checkpoint for the mirror: the local log position it covers and its JSON.
pub type StoredCheckpoint = Option<(u64, Arc<Vec<u8>>)>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl SharedState {
    /// Opens (creating if needed, with `replicas` copies each) the state object store and the
    /// claims bucket. A cluster (`cluster`: its name) has claims and a checkpoint of its own,
    /// so two clusters reading the same stream (production and a staging copy) never
    /// suppress each other's actions.
    pub async fn connect(
        client: &async_nats::Client,
        replicas: usize,
        cluster: Option<&str>,
    ) -> Result<SharedState, BoxError> {
        let claims_bucket = match cluster {
            Some(name) => format!("{CLAIMS_BUCKET}_{name}"),
            None => CLAIMS_BUCKET.to_owned(),
        };
        let checkpoint = match cluster {
            Some(name) => format!("{CHECKPOINT}-{name}"),
            None => CHECKPOINT.to_owned(),
        };
        let js = jetstream::new(client.clone());
        let objects = match js.get_object_store(STATE_BUCKET).await {
            Ok(o) => o,
            Err(_) => {
                js.create_object_store(object_store::Config {
                    bucket: STATE_BUCKET.to_owned(),
                    description: Some("Spur trigger-state checkpoints".to_owned()),
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await?
            }
        };
        let claims = match js.get_key_value(&claims_bucket).await {
            Ok(k) => k,
            Err(_) => {
                js.create_key_value(kv::Config {
                    bucket: claims_bucket.clone(),
                    description: "Spur firings whose actions were dispatched".to_owned(),
                    history: 1,
                    max_age: Duration::from_secs(7 * 24 * 3600),
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await?
            }
        };
        Ok(SharedState {
            objects,
            claims,
            checkpoint,
        })
    }

    /// The stored checkpoint (JSON), if any.
    pub async fn load_checkpoint(&self) -> Option<Vec<u8>> {
        let mut object = self.objects.get(&self.checkpoint).await.ok()?;
        let mut bytes = Vec::new();
        object.read_to_end(&mut bytes).await.ok()?;
        Some(bytes)
    }

    async fn save_checkpoint(&self, bytes: &[u8]) -> Result<(), BoxError> {
        let mut reader = bytes;
        self.objects
            .put(self.checkpoint.as_str(), &mut reader)
            .await?;
        Ok(())
    }

    /// Claims a firing for `owner` (the instance's id); false if another instance already
    /// did. A claim this instance made before a restart still counts as its own, so a crash
    /// in the middle of dispatching is finished on restart rather than dropped. When
    /// JetStream cannot say, the firing is dispatched anyway: alone, running the actions
    /// again beats never running them. (Cluster mode uses [`SharedState::try_claim`] and
    /// waits instead: there another member is there to act.)
    pub async fn claim(&self, firing: Uuid, owner: Uuid) -> bool {
        match self.try_claim(firing, owner).await {
            Claim::Ours => true,
            Claim::Theirs => false,
            Claim::Unknown => {
                warn!(%firing, "claiming failed; dispatching anyway");
                true
            }
        }
    }

    /// Claims a firing for `owner`, saying whether it is this instance's, another's, or
    /// cannot be told now (JetStream unreachable after a few tries).
    pub async fn try_claim(&self, firing: Uuid, owner: Uuid) -> Claim {
        let key = firing.to_string();
        let value: Vec<u8> = owner.to_string().into_bytes();
        for _ in 0..3 {
            match self.claims.create(&key, value.clone().into()).await {
                Ok(_) => return Claim::Ours,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    return match self.claims.get(&key).await {
                        Ok(Some(holder)) if holder.as_ref() == value.as_slice() => Claim::Ours,
                        Ok(Some(_)) => Claim::Theirs,
                        _ => Claim::Unknown,
                    };
                }
                Err(e) => {
                    warn!(error = %e, %firing, "cannot claim a firing in JetStream KV; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        Claim::Unknown
    }

    /// The instance that claimed `firing`, if any has.
    pub async fn holder(&self, firing: Uuid) -> Option<Uuid> {
        let bytes = self.claims.get(firing.to_string()).await.ok()??;
        std::str::from_utf8(&bytes).ok()?.parse().ok()
    }

    /// Stores each new checkpoint the pipeline publishes, then announces the log position it
    /// covers (the NATS consumer acknowledges up to there).
    pub async fn mirror(
        self,
        mut checkpoints: watch::Receiver<StoredCheckpoint>,
        covered: watch::Sender<u64>,
    ) {
        let mut announced = false;
        let mut last_upload: Option<tokio::time::Instant> = None;
        while checkpoints.changed().await.is_ok() {
            // At most one upload per MIRROR_INTERVAL (each is a whole snapshot, hashed and
            // chunked); a checkpoint arriving after a quiet spell is uploaded at once.
            if let Some(last) = last_upload {
                tokio::time::sleep_until(last + MIRROR_INTERVAL).await;
            }
            last_upload = Some(tokio::time::Instant::now());
            let latest = checkpoints.borrow_and_update().clone();
            let Some((seq, bytes)) = latest else { continue };
            match self.save_checkpoint(&bytes).await {
                Ok(()) => {
                    // Once at info (the first one covering events), then at debug.
                    if !announced && seq > 0 {
                        announced = true;
                        info!(seq, "trigger-state checkpoint stored in JetStream");
                    } else {
                        debug!(seq, "trigger-state checkpoint stored in JetStream");
                    }
                    let _ = covered.send(seq);
                }
                Err(e) => {
                    warn!(error = %e, "cannot store the checkpoint in JetStream; acknowledgements wait")
                }
            }
        }
        info!("checkpoint mirror stopped");
    }
}
