//! Webhook request authentication.
//!
//! * `api_key` (Prefect Cloud's): `Authorization: Bearer <key>`. Only SHA-256 hashes of keys
//!   are stored; the key is shown once, when created or rotated.
//! * HMAC presets, beyond Prefect: `github` (`X-Hub-Signature-256: sha256=<hex>`), `stripe`
//!   (`Stripe-Signature: t=<ts>,v1=<hex>` over `"<ts>.<body>"`, timestamp tolerance),
//!   `standard` (Standard Webhooks: `webhook-id`, `webhook-timestamp`,
//!   `webhook-signature: v1,<base64>` over `"<id>.<ts>.<body>"`, tolerance and id replay
//!   protection), and `generic` (a header, an algorithm, hex or base64, an optional prefix).
//!   Up to two secrets are active at once, so a secret can be rotated without downtime.
//!
//! Every comparison is constant-time. Secrets are kept encrypted at rest (see
//! [`SecretBox`]); they are decrypted only to verify a request.

use std::collections::VecDeque;
use std::sync::Mutex;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How a webhook authenticates requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WebhookAuth {
    /// `Authorization: Bearer <key>`; SHA-256 hex digests of the accepted keys.
    ApiKey {
        /// Hashes of the active keys (at most two).
        key_hashes: Vec<String>,
    },
    /// An HMAC signature scheme.
    Hmac {
        /// Which scheme.
        preset: HmacPreset,
        /// The active secrets, encrypted (at most two).
        secrets: Vec<String>,
        /// Seconds a signed timestamp may be off (stripe, standard).
        #[serde(default = "default_tolerance")]
        tolerance_secs: i64,
        /// For `generic`: the header carrying the signature.
        #[serde(default)]
        header: Option<String>,
        /// For `generic`: `sha256` (default), `sha1`.
        #[serde(default)]
        algorithm: Option<String>,
        /// For `generic`: `hex` (default) or `base64`.
        #[serde(default)]
        encoding: Option<String>,
        /// For `generic`: a prefix before the signature, e.g. `sha256=`.
        #[serde(default)]
        prefix: Option<String>,
    },
}

fn default_tolerance() -> i64 {
    300
}

/// The HMAC schemes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HmacPreset {
    /// GitHub: `X-Hub-Signature-256: sha256=<hex>` of the body.
    Github,
    /// Stripe: `Stripe-Signature: t=…,v1=…` over `t.body`.
    Stripe,
    /// Standard Webhooks: `webhook-signature: v1,<b64>` over `id.ts.body`.
    Standard,
    /// Any header, algorithm and encoding.
    Generic,
}

/// Why a request was refused (the handler answers 401 without saying which).
#[derive(Debug, PartialEq, Eq)]
pub struct AuthFailure(pub String);

impl AuthFailure {
    /// A short, fixed label for the reason (the metric's `reason` label).
    pub fn label(&self) -> &'static str {
        let r = self.0.as_str();
        if r.starts_with("missing") {
            "missing_header"
        } else if r == "wrong API key" {
            "wrong_key"
        } else if r == "bad signature" {
            "bad_signature"
        } else if r == "stale timestamp" {
            "stale_timestamp"
        } else if r.starts_with("replayed") {
            "replayed"
        } else if r == "no usable secret" {
            "no_secret"
        } else {
            "bad_timestamp"
        }
    }
}

/// Hex SHA-256 of an API key, the only form keys are stored in.
pub fn hash_key(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Constant-time equality.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hmac_sha256(secret: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC accepts any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

fn hmac_sha1(secret: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac =
        <Hmac<sha1::Sha1> as Mac>::new_from_slice(secret).expect("HMAC accepts any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

/// Encrypts secrets at rest with a key kept in the data folder (ChaCha20-Poly1305).
#[derive(Clone)]
pub struct SecretBox {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox")
    }
}

impl SecretBox {
    /// A box using `key` (32 bytes).
    pub fn new(key: &[u8; 32]) -> SecretBox {
        SecretBox {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
        }
    }

    /// Loads the key file, creating it (mode 0600) on first use.
    pub fn open(path: &std::path::Path) -> std::io::Result<SecretBox> {
        if let Ok(bytes) = std::fs::read(path)
            && bytes.len() == 32
        {
            let mut key = [0u8; 32];
            key.copy_from_slice(&bytes);
            return Ok(SecretBox::new(&key));
        }
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, key)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(SecretBox::new(&key))
    }

    /// `nonce || ciphertext`, base64.
    pub fn seal(&self, secret: &str) -> String {
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..12]);
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), secret.as_bytes())
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend(sealed);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// Decrypts what [`SecretBox::seal`] produced.
    pub fn open_secret(&self, sealed: &str) -> Option<Vec<u8>> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .ok()?;
        if bytes.len() < 12 {
            return None;
        }
        let (nonce, body) = bytes.split_at(12);
        self.cipher.decrypt(Nonce::from_slice(nonce), body).ok()
    }
}

/// Durable memory of accepted message ids (the daemon keeps it in its store), so a replay
/// is refused after a restart too.
pub trait ReplayMemory: Send + Sync {
    /// Remembers `key` until `expires` (Unix seconds); true unless it was remembered already
    /// and has not expired at `now`. An error must answer false (refuse rather than replay).
    fn first_time(&self, key: &str, now: i64, expires: i64) -> bool;
}

/// Remembers recently seen message ids (replay protection): Standard Webhooks' `webhook-id`,
/// GitHub's `X-GitHub-Delivery`, and for Stripe (no id) a digest of timestamp and signature.
/// In memory by default; [`ReplayGuard::durable`] keeps them in a [`ReplayMemory`].
#[derive(Default)]
pub struct ReplayGuard {
    seen: Mutex<VecDeque<(String, i64)>>,
    durable: Option<std::sync::Arc<dyn ReplayMemory>>,
}

impl std::fmt::Debug for ReplayGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayGuard")
            .field("durable", &self.durable.is_some())
            .finish()
    }
}

impl ReplayGuard {
    /// A guard whose memory is `memory` (durable), not the process's.
    pub fn durable(memory: std::sync::Arc<dyn ReplayMemory>) -> ReplayGuard {
        ReplayGuard {
            seen: Mutex::default(),
            durable: Some(memory),
        }
    }

    /// True the first time `id` is seen within the window.
    fn first_time(&self, id: &str, now: i64, window: i64) -> bool {
        if let Some(memory) = &self.durable {
            return memory.first_time(id, now, now.saturating_add(window));
        }
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        while seen.front().is_some_and(|(_, at)| now - at > window) {
            seen.pop_front();
        }
        if seen.iter().any(|(s, _)| s == id) {
            return false;
        }
        seen.push_back((id.to_owned(), now));
        if seen.len() > 100_000 {
            seen.pop_front();
        }
        true
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Checks a request against a webhook's auth. `now` is Unix seconds.
pub fn verify(
    auth: &WebhookAuth,
    headers: &[(String, String)],
    body: &[u8],
    secrets: &SecretBox,
    replay: &ReplayGuard,
    now: i64,
) -> Result<(), AuthFailure> {
    let fail = |why: &str| Err(AuthFailure(why.to_owned()));
    match auth {
        WebhookAuth::ApiKey { key_hashes } => {
            let Some(value) = header(headers, "authorization") else {
                return fail("missing Authorization header");
            };
            let key = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .unwrap_or("");
            let hashed = hash_key(key);
            if key_hashes
                .iter()
                .any(|h| constant_time_eq(h.as_bytes(), hashed.as_bytes()))
            {
                Ok(())
            } else {
                fail("wrong API key")
            }
        }
        WebhookAuth::Hmac {
            preset,
            secrets: sealed,
            tolerance_secs,
            header: generic_header,
            algorithm,
            encoding,
            prefix,
        } => {
            let keys: Vec<Vec<u8>> = sealed
                .iter()
                .filter_map(|s| secrets.open_secret(s))
                .collect();
            if keys.is_empty() {
                return fail("no usable secret");
            }
            let stale = |ts: i64| (now - ts).abs() > *tolerance_secs;
            match preset {
                HmacPreset::Github => {
                    let Some(sig) = header(headers, "x-hub-signature-256")
                        .and_then(|v| v.strip_prefix("sha256="))
                    else {
                        return fail("missing X-Hub-Signature-256");
                    };
                    let ok = keys.iter().any(|k| {
                        constant_time_eq(hex(&hmac_sha256(k, &[body])).as_bytes(), sig.as_bytes())
                    });
                    if !ok {
                        return fail("bad signature");
                    }
                    // GitHub signs no timestamp; a delivery id is remembered for the window.
                    if let Some(delivery) = header(headers, "x-github-delivery")
                        && !replay.first_time(
                            &format!("github:{delivery}"),
                            now,
                            *tolerance_secs * 2,
                        )
                    {
                        return fail("replayed delivery id");
                    }
                    Ok(())
                }
                HmacPreset::Stripe => {
                    let Some(value) = header(headers, "stripe-signature") else {
                        return fail("missing Stripe-Signature");
                    };
                    let mut ts = None;
                    let mut sigs = Vec::new();
                    for part in value.split(',') {
                        match part.trim().split_once('=') {
                            Some(("t", t)) => ts = t.parse::<i64>().ok(),
                            Some(("v1", s)) => sigs.push(s.to_owned()),
                            _ => {}
                        }
                    }
                    let Some(ts) = ts else {
                        return fail("no timestamp");
                    };
                    if stale(ts) {
                        return fail("stale timestamp");
                    }
                    let signed = ts.to_string();
                    let ok = keys.iter().any(|k| {
                        let expected = hex(&hmac_sha256(k, &[signed.as_bytes(), b".", body]));
                        sigs.iter()
                            .any(|s| constant_time_eq(expected.as_bytes(), s.as_bytes()))
                    });
                    if !ok {
                        return fail("bad signature");
                    }
                    // Stripe sends no message id: the timestamp and signatures stand for one.
                    let digest = hex(&Sha256::digest(value.as_bytes()));
                    if !replay.first_time(&format!("stripe:{digest}"), now, *tolerance_secs * 2) {
                        return fail("replayed signature");
                    }
                    Ok(())
                }
                HmacPreset::Standard => {
                    let (Some(id), Some(ts), Some(sig)) = (
                        header(headers, "webhook-id"),
                        header(headers, "webhook-timestamp"),
                        header(headers, "webhook-signature"),
                    ) else {
                        return fail("missing webhook-id/-timestamp/-signature");
                    };
                    let Ok(ts_num) = ts.parse::<i64>() else {
                        return fail("bad timestamp");
                    };
                    if stale(ts_num) {
                        return fail("stale timestamp");
                    }
                    let ok = keys.iter().any(|k| {
                        // Standard Webhooks secrets are `whsec_<base64>`; the raw key is decoded.
                        let key = std::str::from_utf8(k)
                            .ok()
                            .and_then(|s| s.strip_prefix("whsec_"))
                            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                            .unwrap_or_else(|| k.clone());
                        let expected = base64::engine::general_purpose::STANDARD.encode(
                            hmac_sha256(&key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]),
                        );
                        sig.split_whitespace()
                            .filter_map(|s| s.strip_prefix("v1,"))
                            .any(|s| constant_time_eq(expected.as_bytes(), s.as_bytes()))
                    });
                    if !ok {
                        return fail("bad signature");
                    }
                    if !replay.first_time(&format!("standard:{id}"), now, *tolerance_secs * 2) {
                        return fail("replayed message id");
                    }
                    Ok(())
                }
                HmacPreset::Generic => {
                    let name = generic_header.as_deref().unwrap_or("x-signature");
                    let Some(value) = header(headers, name) else {
                        return fail("missing signature header");
                    };
                    let value = prefix
                        .as_deref()
                        .and_then(|p| value.strip_prefix(p))
                        .unwrap_or(value);
                    let ok = keys.iter().any(|k| {
                        let mac = match algorithm.as_deref() {
                            Some("sha1") => hmac_sha1(k, &[body]),
                            _ => hmac_sha256(k, &[body]),
                        };
                        let expected = match encoding.as_deref() {
                            Some("base64") => base64::engine::general_purpose::STANDARD.encode(mac),
                            _ => hex(&mac),
                        };
                        constant_time_eq(expected.as_bytes(), value.as_bytes())
                    });
                    if ok { Ok(()) } else { fail("bad signature") }
                }
            }
        }
    }
}

/// Signing helpers, for tests and for users checking their senders.
pub mod sign {
    use super::*;

    /// GitHub's header value.
    pub fn github(secret: &str, body: &[u8]) -> String {
        format!("sha256={}", hex(&hmac_sha256(secret.as_bytes(), &[body])))
    }

    /// Stripe's header value.
    pub fn stripe(secret: &str, ts: i64, body: &[u8]) -> String {
        let t = ts.to_string();
        format!(
            "t={t},v1={}",
            hex(&hmac_sha256(secret.as_bytes(), &[t.as_bytes(), b".", body]))
        )
    }

    /// Standard Webhooks' signature header value (`secret` is `whsec_<base64>`).
    pub fn standard(secret: &str, id: &str, ts: i64, body: &[u8]) -> String {
        let key = secret
            .strip_prefix("whsec_")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .unwrap_or_else(|| secret.as_bytes().to_vec());
        let t = ts.to_string();
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(hmac_sha256(
                &key,
                &[id.as_bytes(), b".", t.as_bytes(), b".", body]
            ))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed() -> SecretBox {
        SecretBox::new(&[7u8; 32])
    }

    fn hmac_auth(preset: HmacPreset, secrets: &[&str]) -> WebhookAuth {
        let b = boxed();
        WebhookAuth::Hmac {
            preset,
            secrets: secrets.iter().map(|s| b.seal(s)).collect(),
            tolerance_secs: 300,
            header: None,
            algorithm: None,
            encoding: None,
            prefix: None,
        }
    }

    #[test]
    fn secrets_are_sealed_and_open_again() {
        let b = boxed();
        let sealed = b.seal("s3cret");
        assert!(!sealed.contains("s3cret"));
        assert_eq!(b.open_secret(&sealed), Some(b"s3cret".to_vec()));
        assert_eq!(SecretBox::new(&[8u8; 32]).open_secret(&sealed), None);
    }

    #[test]
    fn presets_accept_valid_and_refuse_wrong_stale_and_replayed() {
        let body = br#"{"a":1}"#;
        let now = 1_700_000_000;
        let replay = ReplayGuard::default();
        // One header, verified against `auth` at `now`.
        let check = |auth: &WebhookAuth, header: &str, value: String| {
            verify(
                auth,
                &[(header.to_owned(), value)],
                body,
                &boxed(),
                &replay,
                now,
            )
        };
        // GitHub, with a rotated second secret.
        let gh = hmac_auth(HmacPreset::Github, &["old", "new"]);
        assert!(check(&gh, "X-Hub-Signature-256", sign::github("new", body)).is_ok());
        assert!(check(&gh, "X-Hub-Signature-256", sign::github("bad", body)).is_err());
        // Stripe: valid, stale.
        let st = hmac_auth(HmacPreset::Stripe, &["sk"]);
        assert!(check(&st, "Stripe-Signature", sign::stripe("sk", now, body)).is_ok());
        assert!(
            check(
                &st,
                "Stripe-Signature",
                sign::stripe("sk", now - 1000, body)
            )
            .is_err()
        );
        // Standard Webhooks: valid once, then replayed.
        let secret = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(b"key-bytes")
        );
        let sw = hmac_auth(HmacPreset::Standard, &[&secret]);
        let headers = vec![
            ("webhook-id".to_owned(), "msg_1".to_owned()),
            ("webhook-timestamp".to_owned(), now.to_string()),
            (
                "webhook-signature".to_owned(),
                sign::standard(&secret, "msg_1", now, body),
            ),
        ];
        assert!(verify(&sw, &headers, body, &boxed(), &replay, now).is_ok());
        assert_eq!(
            verify(&sw, &headers, body, &boxed(), &replay, now),
            Err(AuthFailure("replayed message id".into()))
        );
        // API key: hashed.
        let key = WebhookAuth::ApiKey {
            key_hashes: vec![hash_key("k-123")],
        };
        assert!(check(&key, "Authorization", "Bearer k-123".into()).is_ok());
        assert!(check(&key, "Authorization", "Bearer nope".into()).is_err());
    }
}
