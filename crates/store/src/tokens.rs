//! API tokens and remembered webhook message ids.
//!
//! * `api_tokens`: one record per named token (`name → {name, scope, hash, created}`). Only a
//!   hash of the secret is stored (the daemon hashes it as it hashes webhook API keys); the
//!   secret itself is shown once, when the token is created.
//! * `webhook_replay`: the message ids (or signature digests) of webhook requests already
//!   accepted, each with the Unix time after which it may be forgotten. Written in the same
//!   commit as the check, so a replay is refused after a restart too.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableError};
use serde::{Deserialize, Serialize};

use crate::{Store, StoreError, corrupt};

const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_tokens");
const REPLAY: TableDefinition<&str, i64> = TableDefinition::new("webhook_replay");

/// Remembered ids beyond which an insert first prunes the expired ones.
const PRUNE_EVERY: u64 = 1024;

/// One API token, as stored (never the secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Unique name.
    pub name: String,
    /// `events:write`, `events:read` or `admin`.
    pub scope: String,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    /// When it was created (RFC 3339).
    pub created: String,
}

fn absent<T>(result: Result<T, TableError>) -> Result<Option<T>, StoreError> {
    match result {
        Ok(table) => Ok(Some(table)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Store {
    /// Saves a new token; false (and nothing written) if one already has its name.
    pub fn create_token(&self, token: &TokenRecord) -> Result<bool, StoreError> {
        let bytes = serde_json::to_vec(token).map_err(corrupt)?;
        let txn = self.db.begin_write()?;
        let created = {
            let mut table = txn.open_table(TOKENS)?;
            if table.get(token.name.as_str())?.is_some() {
                false
            } else {
                table.insert(token.name.as_str(), bytes.as_slice())?;
                true
            }
        };
        txn.commit()?;
        Ok(created)
    }

    /// Every token, by name.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let Some(table) = absent(txn.open_table(TOKENS))? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
        }
        Ok(out)
    }

    /// Deletes a token by name; true if it existed.
    pub fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = {
            let mut table = txn.open_table(TOKENS)?;
            table.remove(name)?.is_some()
        };
        txn.commit()?;
        Ok(existed)
    }

    /// Remembers `key` until `expires` (Unix seconds) and returns true, unless it is
    /// remembered already and not expired at `now` (then false: a replay). Durable: the
    /// answer holds across restarts.
    pub fn remember_once(&self, key: &str, now: i64, expires: i64) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let first = {
            let mut table = txn.open_table(REPLAY)?;
            let seen = table.get(key)?.map(|v| v.value());
            match seen {
                Some(until) if until >= now => false,
                _ => {
                    if table.len()? >= PRUNE_EVERY {
                        table.retain(|_, until| until >= now)?;
                    }
                    table.insert(key, expires)?;
                    true
                }
            }
        };
        txn.commit()?;
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_replay_memory_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        {
            let store = Store::open(&path).expect("open");
            assert!(store.tokens().expect("tokens").is_empty());
            let t = TokenRecord {
                name: "pub".into(),
                scope: "events:write".into(),
                hash: "ab".into(),
                created: "2024-01-01T00:00:00Z".into(),
            };
            assert!(store.create_token(&t).expect("create"));
            assert!(!store.create_token(&t).expect("again"));
            assert!(store.remember_once("msg_1", 100, 700).expect("first"));
            assert!(!store.remember_once("msg_1", 200, 800).expect("replay"));
        }
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.tokens().expect("tokens").len(), 1);
        assert!(
            !store
                .remember_once("msg_1", 300, 900)
                .expect("replay after reopen")
        );
        assert!(store.remember_once("msg_1", 701, 1300).expect("expired"));
        assert!(store.revoke_token("pub").expect("revoke"));
        assert!(!store.revoke_token("pub").expect("revoke again"));
    }
}
