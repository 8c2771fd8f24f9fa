//! Cluster mode (`--cluster NAME`): several instances share the automations, and each
//! automation's firings are acted on by exactly one of them at a time.
//!
//! **How the work is divided.** Every member reads the whole `SPUR_EVENTS` stream through
//! its own durable consumer and evaluates it in stream order at the stream's timestamps
//! (`spur_ingest::nats`), so every member derives the same firings with the same ids. The
//! automations are hashed into [`PARTITIONS`] partitions; a member *acts* (claims, runs the
//! actions, emits the firing's events) only on the firings of partitions it holds a lease
//! on. The trigger state of every automation is therefore already up to date on every
//! member: a takeover needs no state transfer, only the lease, and it is exact because the
//! evaluation is deterministic.
//!
//! **Leases** live in the key-value bucket `SPUR_CLUSTER_<NAME>`, whose `max_age` is the
//! lease (JetStream ages entries out by its own clock, so members' clocks need not agree):
//!
//! * `members.<instance>`: each member's record ([`Member`]), rewritten every
//!   [`ClusterConfig::renew_every`]; a member that stops rewriting it ages out.
//! * `owners.<partition>`: the member holding the partition. It is created only if absent
//!   (create-only), renewed by compare-and-set on its revision, and ages out when its holder
//!   stops renewing.
//!
//! Each partition's wanted owner is the live member ranked first by rendezvous hashing of
//! (partition, member), so a member joining or leaving moves only its own share. A holder
//! that is not the wanted owner releases the partition (deletes the key) and the wanted owner
//! creates it on its next round: that is the rebalance.
//!
//! **Fencing.** A member counts a lease as its own only until `sent + lease × 3/4`, where
//! `sent` is when it sent the renewal JetStream accepted. JetStream's expiry is at least a
//! full lease after it received that renewal, so a member that cannot renew (paused,
//! partitioned) stops acting on a partition at least a quarter lease before anyone else may
//! take it. Belt and braces: a firing is still claimed create-only in `SPUR_FIRINGS` before its
//! actions run (`shared_state`), so even two members that both believed they held a lease
//! would not both act.
//!
//! **Pauses are the cluster's.** An automation paused or resumed through any member's API
//! (or by a `pause-automation` action) is written to the bucket `SPUR_PAUSES_<NAME>` (one
//! key per paused automation, no expiry), and every member follows that bucket and pauses
//! or resumes its own copy within moments ([`Cluster::follow_pauses`]): whoever holds the
//! automation's partition, now or after a takeover, sees it paused.
//!
//! **Firings of partitions a member does not hold** are parked by the executor
//! (`actions.rs`) until someone has claimed them; if this member gets the partition first
//! (its holder died before claiming), it claims and acts on them itself. Nothing is lost
//! in the handover, and the claim keeps anything from running twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};
use uuid::Uuid;

/// How many partitions the automations are hashed into. Fixed: a partition's id is part of
/// its lease key, and every member must agree on the hash.
pub const PARTITIONS: u32 = 64;

/// Cluster settings (`--cluster`, `--cluster-lease`).
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// The cluster's name: members with the same name share automations. Letters, digits,
    /// `-` and `_` (it is part of a bucket name).
    pub name: String,
    /// How long a lease lasts without renewal: a dead member's automations are taken over
    /// within about this much time (plus one renewal round).
    pub lease: Duration,
}

impl ClusterConfig {
    /// A cluster called `name` with the default 3 s lease.
    pub fn new(name: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            name: name.into(),
            lease: Duration::from_secs(3),
        }
    }

    /// How often leases and the member record are renewed: a quarter of the lease.
    pub fn renew_every(&self) -> Duration {
        (self.lease / 4).max(Duration::from_millis(50))
    }

    /// How long a renewal sent at some instant counts (see the module's **Fencing**).
    fn valid_for(&self) -> Duration {
        self.lease * 3 / 4
    }

    /// Checks the name before it becomes part of a bucket name.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "cluster name {:?}: use 1 to 64 letters, digits, '-' or '_'",
                self.name
            ));
        }
        if self.lease < Duration::from_millis(500) {
            return Err(format!(
                "cluster lease {:?} is too short: at least 500ms",
                self.lease
            ));
        }
        Ok(())
    }
}

/// The partition an automation belongs to (FNV-1a of its id's bytes).
pub fn partition_of(automation: Uuid) -> u32 {
    (fnv1a(automation.as_bytes()) % u64::from(PARTITIONS)) as u32
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The member a partition should belong to among `members`: the one whose (partition,
/// member) hash ranks highest (rendezvous hashing). `None` when there are no members.
pub fn wanted_owner(partition: u32, members: &BTreeSet<Uuid>) -> Option<Uuid> {
    members.iter().copied().max_by_key(|member| {
        let mut bytes = [0u8; 20];
        bytes[..4].copy_from_slice(&partition.to_be_bytes());
        bytes[4..].copy_from_slice(member.as_bytes());
        // A final mix spreads FNV's weak low bits.
        let h = fnv1a(&bytes);
        (h ^ (h >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    })
}

/// What a member says about itself in `members.<instance>`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Member {
    /// The instance id (its data folder's).
    pub instance: Uuid,
    /// Where its HTTP API listens.
    pub api: String,
    /// The partitions it holds.
    pub partitions: Vec<u32>,
    /// The stream sequence of the last batch its pipeline applied.
    pub stream_seq: u64,
    /// When it wrote this record (its own clock).
    pub at: DateTime<Utc>,
}

/// `/api/cluster`: members, who owns which partition, lag behind the stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The cluster's name.
    pub name: String,
    /// The instance that answered.
    pub instance: Uuid,
    /// The lease, in seconds.
    pub lease_seconds: f64,
    /// The stream's last sequence (what lag is measured against).
    pub stream_last_seq: u64,
    /// Live members, with their share.
    pub members: Vec<MemberStatus>,
    /// Owner of each partition (`None`: unowned right now, e.g. during a takeover).
    pub partitions: Vec<Option<Uuid>>,
    /// How many of the loaded automations fall in each partition.
    pub automations_per_partition: Vec<u32>,
}

/// One live member in [`ClusterStatus`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Its record.
    #[serde(flatten)]
    pub member: Member,
    /// Automations in the partitions it holds.
    pub automations: u32,
    /// Stream messages it has not applied yet.
    pub lag: u64,
}

/// A member of a cluster: its leases, and the loop that keeps them.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.inner.config.name)
            .field("instance", &self.inner.instance)
            .finish()
    }
}

struct Inner {
    config: ClusterConfig,
    instance: Uuid,
    kv: kv::Store,
    /// `SPUR_PAUSES_<NAME>`: a key per automation paused cluster-wide (see the module docs).
    pauses: kv::Store,
    js: jetstream::Context,
    stream: String,
    api: String,
    /// Per partition: until when this member may act on it (`None`: not held).
    held: Mutex<Vec<Option<Instant>>>,
    /// The daemon's metrics: the pipeline's applied stream sequence (`stream_seq`).
    metrics: Arc<crate::metrics::Metrics>,
    /// When this member last gained a partition (for the takeover log line).
    gained: Mutex<BTreeMap<u32, Instant>>,
}

/// Why joining a cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The settings are unusable.
    #[error("{0}")]
    Config(String),
    /// JetStream refused to create or open the bucket.
    #[error("cannot open the cluster bucket {bucket}: {reason}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// Why.
        reason: String,
    },
}

/// Opens the bucket `config.bucket`, creating it with `config` if it is not there.
async fn open_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, ClusterError> {
    if let Ok(kv) = js.get_key_value(&config.bucket).await {
        return Ok(kv);
    }
    let bucket = config.bucket.clone();
    js.create_key_value(config)
        .await
        .map_err(|e| ClusterError::Bucket {
            bucket,
            reason: e.to_string(),
        })
}

impl Cluster {
    /// Opens (creating if needed) the cluster's buckets. The member takes no lease until
    /// [`Cluster::run`] runs.
    pub async fn join(
        client: &async_nats::Client,
        config: ClusterConfig,
        instance: Uuid,
        stream: &str,
        replicas: usize,
        api: String,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Cluster, ClusterError> {
        config.validate().map_err(ClusterError::Config)?;
        let js = jetstream::new(client.clone());
        let kv = open_bucket(
            &js,
            kv::Config {
                bucket: format!("SPUR_CLUSTER_{}", config.name),
                description: format!("Spur cluster {}: members and leases", config.name),
                history: 1,
                max_age: config.lease,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        let pauses = open_bucket(
            &js,
            kv::Config {
                bucket: format!("SPUR_PAUSES_{}", config.name),
                description: format!("Spur cluster {}: paused automations", config.name),
                history: 1,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(Cluster {
            inner: Arc::new(Inner {
                config,
                instance,
                kv,
                pauses,
                js,
                stream: stream.to_owned(),
                api,
                held: Mutex::new(vec![None; PARTITIONS as usize]),
                metrics,
                gained: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// This member's instance id.
    pub fn instance(&self) -> Uuid {
        self.inner.instance
    }

    /// The settings.
    pub fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    /// May this member act on `automation`'s firings now (it holds a lease on its partition
    /// that has not run out)?
    pub fn owns(&self, automation: Uuid) -> bool {
        self.holds(partition_of(automation))
    }

    fn holds(&self, partition: u32) -> bool {
        let held = self.inner.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(partition as usize)
            .copied()
            .flatten()
            .is_some_and(|until| Instant::now() < until)
    }

    /// The partitions this member holds now.
    pub fn held_partitions(&self) -> Vec<u32> {
        (0..PARTITIONS).filter(|p| self.holds(*p)).collect()
    }

    /// Notes that this member acted on a firing of `automation`: the first one after gaining
    /// its partition is logged with the time since the gain (the takeover's second half).
    pub fn note_acted(&self, automation: Uuid) {
        let partition = partition_of(automation);
        let gained = self
            .inner
            .gained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&partition);
        if let Some(at) = gained {
            info!(
                partition,
                after_ms = at.elapsed().as_millis() as u64,
                "cluster: first firing acted on since taking the partition"
            );
        }
    }

    /// Keeps the member record and the leases until `shutdown`, then releases them all so
    /// the others take over at once instead of after a lease.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.inner.config.renew_every());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(
            cluster = %self.inner.config.name,
            instance = %self.inner.instance,
            lease_ms = self.inner.config.lease.as_millis() as u64,
            "cluster: joined"
        );
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => break,
            }
            if let Err(e) = self.round().await {
                warn!(error = %e, "cluster: a lease round failed; leases run out unless renewed");
            }
        }
        self.leave().await;
    }

    /// One round: rewrite the member record, read who is alive, then renew, release or take
    /// each partition.
    async fn round(&self) -> Result<(), kv::PutError> {
        let me = self.inner.instance;
        let record = Member {
            instance: me,
            api: self.inner.api.clone(),
            partitions: self.held_partitions(),
            stream_seq: self.inner.metrics.stream_seq.load(Ordering::Relaxed),
            at: Utc::now(),
        };
        let bytes = serde_json::to_vec(&record).unwrap_or_default();
        self.inner
            .kv
            .put(format!("members.{me}"), bytes.into())
            .await?;
        let members: BTreeSet<Uuid> = match self.members().await {
            Ok(m) => m.into_iter().map(|m| m.instance).chain([me]).collect(),
            Err(e) => {
                warn!(error = %e, "cluster: cannot list members");
                return Ok(());
            }
        };
        for partition in 0..PARTITIONS {
            let wanted = wanted_owner(partition, &members);
            self.tend(partition, wanted == Some(me)).await;
        }
        Ok(())
    }

    /// Renews, releases or takes one partition's lease.
    async fn tend(&self, partition: u32, wanted_here: bool) {
        let me = self.inner.instance;
        let key = format!("owners.{partition}");
        let entry = match self.inner.kv.entry(&key).await {
            Ok(entry) => entry.filter(|e| e.operation == kv::Operation::Put),
            Err(e) => {
                warn!(error = %e, partition, "cluster: cannot read a lease");
                return;
            }
        };
        let holder = entry
            .as_ref()
            .and_then(|e| std::str::from_utf8(&e.value).ok())
            .and_then(|v| v.parse::<Uuid>().ok());
        let value = me.to_string().into_bytes();
        let sent = Instant::now();
        match (entry, holder) {
            (Some(entry), Some(holder)) if holder == me => {
                if !wanted_here {
                    // Stop acting first, then hand it over.
                    self.set_held(partition, None);
                    if let Err(e) = self
                        .inner
                        .kv
                        .delete_expect_revision(&key, Some(entry.revision))
                        .await
                    {
                        warn!(error = %e, partition, "cluster: cannot release a lease; it runs out");
                    } else {
                        info!(
                            partition,
                            "cluster: released a partition to its wanted owner"
                        );
                    }
                    return;
                }
                match self
                    .inner
                    .kv
                    .update(&key, value.into(), entry.revision)
                    .await
                {
                    Ok(_) => self.set_held(partition, Some(sent + self.inner.config.valid_for())),
                    Err(e) => {
                        warn!(error = %e, partition, "cluster: lost a lease");
                        self.set_held(partition, None);
                    }
                }
            }
            (Some(_), _) => self.set_held(partition, None),
            (None, _) => {
                if wanted_here {
                    match self.inner.kv.create(&key, value.into()).await {
                        Ok(_) => {
                            let first = !self.holds(partition);
                            self.set_held(partition, Some(sent + self.inner.config.valid_for()));
                            if first {
                                self.inner
                                    .gained
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(partition, Instant::now());
                                info!(partition, "cluster: took a partition");
                            }
                        }
                        // Someone else was faster; it is theirs until they release it.
                        Err(_) => self.set_held(partition, None),
                    }
                } else {
                    self.set_held(partition, None);
                }
            }
        }
    }

    fn set_held(&self, partition: u32, until: Option<Instant>) {
        let mut held = self.inner.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = held.get_mut(partition as usize) {
            *slot = until;
        }
    }

    /// Lets go of every lease and the member record (a clean stop): the others take over in
    /// one round instead of after a lease.
    async fn leave(&self) {
        let held = self.held_partitions();
        for partition in 0..PARTITIONS {
            self.set_held(partition, None);
        }
        for partition in held {
            let _ = self.inner.kv.delete(format!("owners.{partition}")).await;
        }
        let _ = self
            .inner
            .kv
            .delete(format!("members.{}", self.inner.instance))
            .await;
        info!(cluster = %self.inner.config.name, "cluster: left");
    }

    /// Tells every member that `automation` is paused (or resumed): its key in the pauses
    /// bucket is written (or deleted). Each member, this one too, applies it through
    /// [`Cluster::follow_pauses`].
    pub async fn share_pause(&self, automation: Uuid, paused: bool) -> Result<(), String> {
        let key = automation.to_string();
        let written = if paused {
            self.inner
                .pauses
                .put(key, b"paused".to_vec().into())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            self.inner
                .pauses
                .delete(key)
                .await
                .map_err(|e| e.to_string())
        };
        written.map_err(|e| format!("the other cluster members could not be told: {e}"))
    }

    /// Applies the cluster's pauses to this member's pipeline until `shutdown`: first the
    /// bucket's current state (what changed while this member was away), then each change
    /// as it is written. A watch that breaks (NATS away) is opened again, with its history,
    /// after a short wait.
    pub async fn follow_pauses(
        self,
        control: tokio::sync::mpsc::Sender<crate::pipeline::Control>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.inner.pauses.watch_with_history(">").await {
                Ok(mut changes) => loop {
                    let change = tokio::select! {
                        _ = shutdown.changed() => return,
                        change = changes.next() => change,
                    };
                    let Some(Ok(entry)) = change else { break };
                    backoff = Duration::from_millis(200);
                    let Ok(automation) = entry.key.parse::<Uuid>() else {
                        continue;
                    };
                    let paused = matches!(entry.operation, kv::Operation::Put);
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let sent = control
                        .send(crate::pipeline::Control::SetPaused(automation, paused, tx))
                        .await;
                    if sent.is_err() {
                        return;
                    }
                    // An automation this member does not load (yet) is not an error here.
                    if let Ok(Ok(())) = rx.await {
                        tracing::debug!(%automation, paused, "cluster: pause applied");
                    }
                },
                Err(e) => {
                    warn!(error = %e, "cluster: cannot follow the paused automations; trying again")
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// The live members' records.
    async fn members(&self) -> Result<Vec<Member>, String> {
        let mut keys = self.inner.kv.keys().await.map_err(|e| e.to_string())?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| e.to_string())?;
            if key.starts_with("members.") {
                names.push(key);
            }
        }
        let mut members = Vec::new();
        for key in names {
            if let Ok(Some(bytes)) = self.inner.kv.get(&key).await
                && let Ok(member) = serde_json::from_slice::<Member>(&bytes)
            {
                members.push(member);
            }
        }
        members.sort_by_key(|m| m.instance);
        Ok(members)
    }

    /// Everything `/api/cluster` shows; `automations` are the ids loaded here (every member
    /// loads the same folder).
    pub async fn status(&self, automations: &[Uuid]) -> Result<ClusterStatus, String> {
        let members = self.members().await?;
        let mut partitions = vec![None; PARTITIONS as usize];
        for (partition, slot) in partitions.iter_mut().enumerate() {
            if let Ok(Some(entry)) = self.inner.kv.entry(format!("owners.{partition}")).await
                && entry.operation == kv::Operation::Put
            {
                *slot = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|v| v.parse().ok());
            }
        }
        let mut per_partition = vec![0u32; PARTITIONS as usize];
        for id in automations {
            per_partition[partition_of(*id) as usize] += 1;
        }
        let stream_last_seq = match self.inner.js.get_stream(&self.inner.stream).await {
            Ok(mut stream) => stream
                .info()
                .await
                .map(|i| i.state.last_sequence)
                .unwrap_or(0),
            Err(_) => 0,
        };
        let members = members
            .into_iter()
            .map(|member| {
                let automations = partitions
                    .iter()
                    .enumerate()
                    .filter(|(_, owner)| **owner == Some(member.instance))
                    .map(|(p, _)| per_partition[p])
                    .sum();
                MemberStatus {
                    lag: stream_last_seq.saturating_sub(member.stream_seq),
                    automations,
                    member,
                }
            })
            .collect();
        Ok(ClusterStatus {
            name: self.inner.config.name.clone(),
            instance: self.inner.instance,
            lease_seconds: self.inner.config.lease.as_secs_f64(),
            stream_last_seq,
            members,
            partitions,
            automations_per_partition: per_partition,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_and_rendezvous_moves_only_the_leavers_share() {
        let ids: Vec<Uuid> = (0..4000u128).map(Uuid::from_u128).collect();
        let mut counts = vec![0u32; PARTITIONS as usize];
        for id in &ids {
            counts[partition_of(*id) as usize] += 1;
        }
        // 62.5 per partition on average: none empty, none more than double.
        assert!(counts.iter().all(|c| *c > 20 && *c < 125), "{counts:?}");

        let three: BTreeSet<Uuid> = [1u128, 2, 3].map(Uuid::from_u128).into();
        let two: BTreeSet<Uuid> = [1u128, 2].map(Uuid::from_u128).into();
        let mut share = BTreeMap::new();
        for p in 0..PARTITIONS {
            let before = wanted_owner(p, &three).expect("members");
            *share.entry(before).or_insert(0) += 1;
            let after = wanted_owner(p, &two).expect("members");
            if before != Uuid::from_u128(3) {
                assert_eq!(before, after, "partition {p} moved though its owner stayed");
            }
        }
        // Each of three members gets a fair share of 64.
        assert!(share.values().all(|n| *n >= 12), "{share:?}");
        assert_eq!(wanted_owner(0, &BTreeSet::new()), None);
    }

    #[test]
    fn names_that_cannot_be_bucket_names_are_refused() {
        assert!(ClusterConfig::new("prod-1").validate().is_ok());
        assert!(ClusterConfig::new("a.b").validate().is_err());
        assert!(ClusterConfig::new("").validate().is_err());
        let mut short = ClusterConfig::new("x");
        short.lease = Duration::from_millis(100);
        assert!(short.validate().is_err());
    }
}
