//! One credential shared by a fleet of hosts through an etcd v3 cluster
//! (feature `etcd`).
//!
//! A file lock reaches only one host. When the brokers of several hosts
//! (daemons, pods) share one OAuth grant, [`EtcdStore`] moves the
//! coordination onto etcd: Raft consensus, linearizable reads,
//! transactions, and leases. Every promise of the [`Store`] contract holds
//! fleet-wide:
//!
//! - **[`load`](Store::load)** is a linearizable read of the tokens key; its
//!   [`Version`] is the key's `mod_revision`.
//! - **[`save`](Store::save)** is a transaction `If(mod_revision(tokens) ==
//!   R) Then(put)`: it lands only over the tokens it replaces, whoever holds
//!   the lock then. Rotated tokens are first written to a local 0600 spool
//!   file, so that a process killed (or cut off from etcd) after the
//!   provider answered writes them on its next [`load`](Store::load).
//! - **[`lock`](Store::lock)** is a key created under a lease (TTL
//!   [`EtcdSettings::lease_ttl`], kept alive while held). The lock reports
//!   how long the lease certainly lasts, so that the refresh cycle spends a
//!   refresh token only while the lease outlives the request.
//! - **The refresh-in-progress record** is written in a transaction that
//!   requires the lock to still be ours and the tokens to still be at the
//!   revision we read. It names its holder (host, process, lease) and a
//!   hash of the refresh token, never the token. A holder whose lease is
//!   gone is still treated as live for a quarantine
//!   ([`EtcdSettings::quarantine`]) in which its late write may land; after
//!   that, the [`Takeover`] policy decides.
//! - **[`changes`](Store::changes)** is a watch on the tokens key, so every
//!   host adopts new tokens without a request.
//! - **Refusals** seen by one host are keys that every host reads.
//!
//! # Keys
//!
//! Under the prefix `P` (for example `/token-broker/codex`):
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `P/tokens` | the tokens, sealed when a key is configured | until replaced |
//! | `P/lock` | the lock holder (host, pid, lease) | its lease |
//! | `P/refreshing` | the refresh in progress (holder, revision, token hash, deadline) | until cleared |
//! | `P/refused/<sha256>` | when a refresh token was refused | a one-day lease |
//!
//! A role limited to the prefix is enough:
//!
//! ```text
//! etcdctl role add token-broker-codex
//! etcdctl role grant-permission token-broker-codex --prefix=true readwrite /token-broker/codex/
//! etcdctl user add token-broker-codex
//! etcdctl user grant-role token-broker-codex token-broker-codex
//! ```
//!
//! # Tokens at rest
//!
//! With an [`EncryptionKey`], the tokens are sealed with
//! XChaCha20-Poly1305 (a random nonce per write, the tokens key's name as
//! associated data), so that etcd's operators, snapshots and backups never
//! hold a usable token.
//!
//! # The honest limit
//!
//! The token endpoint cannot check a fencing token. A host paused for
//! longer than its lease exactly between the lease check and the request
//! leaving its socket could still spend a refresh token that another host
//! spends after the quarantine. The defaults make that window small: the
//! check requires the lease to outlive the request's timeout plus a grace,
//! the lease lasts at least 30 s (and twice the request timeout plus a
//! second), and the quarantine adds the request timeout plus a
//! margin after the lease is seen gone.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    Txn, TxnOp, WatchOptions,
};
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::{
    Changed, Changes, HeldLock, Loaded, Location, RefreshRecord, Store, StoreError, StoreFuture, StoreLock, Takeover,
    Version,
};
use crate::credentials::{
    expiry_of, format_rfc3339, parse_rfc3339, AccessToken, IdToken, RefreshToken, Secret, TokenSet,
};

/// The format tag of every value this store writes.
const FORMAT: &str = "token-broker-etcd/1";

/// How long a refusal record lives.
const REFUSAL_TTL_SECS: i64 = 24 * 60 * 60;

/// The longest value read from the tokens key.
const MAX_VALUE_BYTES: usize = 256 * 1024;

/// How to reach an etcd cluster and where the credential lives in it.
///
/// ```
/// use token_broker::store::EtcdSettings;
/// let settings = EtcdSettings::new(["http://127.0.0.1:2379"], "/token-broker/codex").unwrap();
/// assert_eq!(settings.prefix(), "/token-broker/codex");
/// ```
#[derive(Clone)]
pub struct EtcdSettings {
    endpoints: Vec<String>,
    prefix: String,
    user: Option<(String, Secret)>,
    tls: Option<EtcdTls>,
    encryption_key: Option<EncryptionKey>,
    spool_dir: Option<PathBuf>,
    lease_ttl: Duration,
    quarantine: Duration,
    takeover: Takeover,
    request_timeout: Duration,
}

impl fmt::Debug for EtcdSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdSettings")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .field("tls", &self.tls.is_some())
            .field("encrypted", &self.encryption_key.is_some())
            .field("spool_dir", &self.spool_dir)
            .field("lease_ttl", &self.lease_ttl)
            .field("quarantine", &self.quarantine)
            .field("takeover", &self.takeover)
            .finish()
    }
}

/// TLS to etcd: a CA to trust, and optionally a client certificate.
/// Its `Debug` never shows the PEM files (the client key is a secret).
#[derive(Clone)]
pub struct EtcdTls {
    /// PEM of the CA that signed the members' certificates.
    pub ca_pem: Vec<u8>,
    /// PEM of the client certificate and its private key, for clusters
    /// that require client certificates.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the members' certificates carry, when it is not the
    /// endpoints' host.
    pub domain: Option<String>,
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("client_certificate", &self.identity_pem.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

/// The 32-byte key that seals tokens at rest. Never printed.
#[derive(Clone)]
pub struct EncryptionKey {
    key: Arc<[u8; 32]>,
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKey({})", self.id())
    }
}

impl EncryptionKey {
    /// A key from 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        EncryptionKey { key: Arc::new(bytes) }
    }

    /// Reads a key file: 32 raw bytes, or their base64 (standard or
    /// URL-safe, padded or not) on one line. The file must not be readable
    /// by group or others. Errors never quote the file's content.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        use std::os::unix::fs::MetadataExt;
        let shown = super::display_path(path);
        let meta = std::fs::metadata(path).map_err(|e| format!("the encryption key file {shown}: {e}"))?;
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "the encryption key file {shown} is readable by others (mode {:o}); chmod 600 it",
                meta.mode() & 0o777
            ));
        }
        if meta.len() > 1024 {
            return Err(format!("the encryption key file {shown} is not a key (over 1 KiB)"));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("the encryption key file {shown}: {e}"))?;
        let decoded = if bytes.len() == 32 {
            Some(bytes)
        } else {
            let text = String::from_utf8_lossy(&bytes);
            let text = text.trim();
            STANDARD
                .decode(text)
                .or_else(|_| URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')))
                .ok()
        };
        match decoded.and_then(|d| <[u8; 32]>::try_from(d.as_slice()).ok()) {
            Some(key) => Ok(EncryptionKey::from_bytes(key)),
            None => Err(format!(
                "the encryption key file {shown} holds no 32-byte key (32 raw bytes, or their base64 on one line)"
            )),
        }
    }

    /// A short public name for the key (the start of its SHA-256), to tell
    /// "sealed with another key" from a damaged value.
    pub fn id(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(&self.key[..]);
        digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.key[..]).into())
    }
}

impl EtcdSettings {
    /// Settings for `endpoints` (`http://host:port` or `https://...`) and
    /// the key prefix the credential lives under (`/token-broker/NAME`).
    /// The prefix must start with `/`, hold no `..` segment and no control
    /// character.
    pub fn new<E: Into<String>>(endpoints: impl IntoIterator<Item = E>, prefix: &str) -> Result<Self, String> {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        super::check_etcd_location(&endpoints, prefix)?;
        let prefix = prefix.trim_end_matches('/');
        Ok(EtcdSettings {
            endpoints,
            prefix: prefix.to_owned(),
            user: None,
            tls: None,
            encryption_key: None,
            spool_dir: None,
            lease_ttl: default_lease_ttl(crate::defaults::DEFAULT_HTTP_TIMEOUT),
            quarantine: crate::defaults::DEFAULT_HTTP_TIMEOUT + Duration::from_secs(5),
            takeover: Takeover::Wait,
            request_timeout: Duration::from_secs(5),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Authenticates as `user` with `password`.
    pub fn user(mut self, user: impl Into<String>, password: Secret) -> Self {
        self.user = Some((user.into(), password));
        self
    }

    /// Connects with TLS.
    pub fn tls(mut self, tls: EtcdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Seals the tokens at rest with `key`.
    pub fn encryption_key(mut self, key: EncryptionKey) -> Self {
        self.encryption_key = Some(key);
        self
    }

    /// Where rotated tokens are spooled before they are written to etcd.
    /// Without one, tokens that reached this process but not etcd live only
    /// in memory until written.
    pub fn spool_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.spool_dir = Some(dir.into());
        self
    }

    /// The lock's lease TTL (at least 5 s). A refresh token is spent only
    /// while the lease outlives the broker's request timeout plus a
    /// second, and keep-alives renew it every third of its TTL: make it
    /// more than one and a half times (request timeout + 1 s). The
    /// default, twice (the default 30 s request timeout + 1 s) = 62 s, fits
    /// any request timeout up to 40 s.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_secs(5));
        self
    }

    /// How long a holder whose lease is gone still counts as live, so that
    /// its late write may land (default: the default request timeout plus
    /// 5 s). Set it to the profile's request timeout plus a margin.
    pub fn quarantine(mut self, quarantine: Duration) -> Self {
        self.quarantine = quarantine;
        self
    }

    /// What to do after an interrupted refresh (default [`Takeover::Wait`]).
    pub fn takeover(mut self, takeover: Takeover) -> Self {
        self.takeover = takeover;
        self
    }

    /// How long one etcd request may take (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
}

/// The default lease for a broker whose request timeout is `timeout`:
/// at least 30 s, and twice the timeout plus its grace.
fn default_lease_ttl(timeout: Duration) -> Duration {
    Duration::from_secs(30).max(timeout.saturating_add(crate::defaults::TIMEOUT_GRACE) * 2)
}

/// A [`Store`] on an etcd v3 cluster. See the [module documentation](self).
/// Clones share one connection.
///
/// ```no_run
/// use std::sync::Arc;
/// use token_broker::store::{EtcdSettings, EtcdStore};
/// use token_broker::TokenBroker;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let settings = EtcdSettings::new(["http://10.0.0.5:2379"], "/token-broker/codex")?
///     .spool_dir("/var/lib/token-broker/spool");
/// let broker = TokenBroker::codex().store(Arc::new(EtcdStore::new(settings))).build()?;
/// # drop(broker); Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    settings: EtcdSettings,
    location: String,
    keys: Keys,
    client: tokio::sync::OnceCell<Client>,
    /// Who we are in records and the lock: host, process and a random tag.
    me: Holder,
    /// The lock we hold, if any: its key's create revision.
    held: Mutex<Option<i64>>,
    /// When we first saw a record's holder lease gone, by record revision.
    gone_since: Mutex<HashMap<i64, Instant>>,
    /// Whether the last etcd request failed.
    unavailable: AtomicBool,
    /// Whether etcd refused our auth token (expired after its TTL, or lost
    /// when the cluster restarted): authenticate again before the next
    /// request.
    reauthenticate: AtomicBool,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("location", &self.location)
            .field("settings", &self.settings)
            .finish()
    }
}

struct Keys {
    tokens: String,
    lock: String,
    record: String,
    refused: String,
}

/// Who holds a lock or a record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Holder {
    host: String,
    pid: u32,
    /// Random per store instance: two processes with one pid on two hosts
    /// (or one after another) never look alike.
    tag: String,
}

impl Holder {
    fn current() -> Self {
        let mut tag = [0u8; 8];
        for b in &mut tag {
            *b = fastrand::u8(..);
        }
        Holder {
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            pid: std::process::id(),
            tag: tag.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

/// The lock key's value.
#[derive(Serialize, Deserialize)]
struct LockValue {
    holder: Holder,
    lease: i64,
    since: String,
}

/// The refresh-in-progress record's value.
#[derive(Serialize, Deserialize)]
struct RecordValue {
    holder: Holder,
    lease: i64,
    /// The tokens' revision the refresh started from.
    revision: i64,
    refresh_token_sha256: String,
    started: String,
    /// Until when the holder's request may still be under way.
    deadline: String,
}

/// The tokens as stored (inside the envelope, sealed or not).
#[derive(Serialize, Deserialize)]
struct StoredTokens {
    access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    account_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_refresh: Option<String>,
}

/// The value of the tokens key.
#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tokens: Option<StoredTokens>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<Sealed>,
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    alg: String,
    key_id: String,
    nonce: String,
    ciphertext: String,
}

/// A spooled write: the encoded value and the revision it replaces.
#[derive(Serialize, Deserialize)]
struct Spooled {
    format: String,
    endpoints: Vec<String>,
    key: String,
    replaces_revision: i64,
    value: String,
}

/// What [`EtcdStore::fleet_status`] reports: everything but secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetStatus {
    /// The tokens key's name.
    pub tokens_key: String,
    /// Whether tokens are stored.
    pub present: bool,
    /// How many times the tokens were written (etcd's key version): the
    /// credential's generation.
    pub generation: i64,
    /// The tokens key's `mod_revision`.
    pub revision: i64,
    /// The access token's expiry.
    pub expires_at: Option<SystemTime>,
    /// When the tokens were last refreshed.
    pub last_refresh: Option<SystemTime>,
    /// Whether the stored value is sealed.
    pub sealed: bool,
    /// The fingerprint of the access token (never the token).
    pub access_fingerprint: Option<String>,
    /// The lock's holder (`host pid N`), if it is held.
    pub lock_holder: Option<String>,
    /// A refresh in progress (or interrupted): holder, start, deadline.
    pub refreshing: Option<String>,
    /// Why the stored tokens cannot be read (damaged, sealed with another
    /// key), when they cannot; the rest of the status stands.
    pub unreadable: Option<String>,
}

/// What an [`EtcdStore::import`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Imported {
    /// No tokens were stored; these are now.
    Created,
    /// Older tokens were replaced (or `force` replaced newer ones).
    Replaced,
    /// The very same tokens were already stored.
    Unchanged,
}

/// Why an [`EtcdStore::import`] refused.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// etcd already holds tokens at least as new as the file's.
    #[error(
        "etcd already holds other tokens that are as new as or newer than the file's (they expire {theirs}); \
         importing would roll the credential back: pass --force to replace them anyway"
    )]
    Newer {
        /// When the stored access token expires.
        theirs: String,
    },
    /// etcd holds a value this profile cannot read (damaged, or sealed
    /// with another key).
    #[error("etcd holds tokens this profile cannot read ({reason}); pass --force to replace them with the file's")]
    Unreadable {
        /// What is wrong with the stored value (never its content).
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EtcdStore {
    /// A store with `settings`. Connects lazily, at the first request, so
    /// that a broker starts (and serves what it can) while etcd is away.
    pub fn new(settings: EtcdSettings) -> Self {
        let p = &settings.prefix;
        let keys = Keys {
            tokens: format!("{p}/tokens"),
            lock: format!("{p}/lock"),
            record: format!("{p}/refreshing"),
            refused: format!("{p}/refused/"),
        };
        EtcdStore {
            inner: Arc::new(Inner {
                location: format!("etcd {p}"),
                keys,
                settings,
                client: tokio::sync::OnceCell::new(),
                me: Holder::current(),
                held: Mutex::new(None),
                gone_since: Mutex::new(HashMap::new()),
                unavailable: AtomicBool::new(false),
                reauthenticate: AtomicBool::new(false),
            }),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &EtcdSettings {
        &self.inner.settings
    }

    /// Whether the last request to etcd failed (no connection, no quorum,
    /// a timeout): coordination is unavailable and nothing is spent.
    pub fn coordination_unavailable(&self) -> bool {
        self.inner.unavailable.load(Ordering::Relaxed)
    }

    /// Seeds the store with `tokens` (read from a Codex or OAuth2 file).
    /// Refuses to replace other tokens that expire no earlier than these
    /// unless `force`; replacing is a compare-and-swap on what was read.
    pub async fn import(&self, tokens: &TokenSet, force: bool) -> Result<Imported, ImportError> {
        let inner = &self.inner;
        let mut client = inner.client().await?;
        let value = inner.encode(tokens)?;
        let current = inner.track(client.get(inner.keys.tokens.as_str(), None).await)?;
        let Some(kv) = current.kvs().first() else {
            let txn = Txn::new()
                .when([Compare::create_revision(
                    inner.keys.tokens.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(inner.keys.tokens.as_str(), value, None)]);
            let done = inner.track(client.txn(txn).await)?;
            return if done.succeeded() {
                Ok(Imported::Created)
            } else {
                Err(StoreError::Conflict { location: inner.loc() }.into())
            };
        };
        match inner.decode(kv.value()) {
            Ok(stored) => {
                if !stored.differs_from(tokens) {
                    return Ok(Imported::Unchanged);
                }
                let theirs = stored.expiry.map(|e| e.at);
                let ours = tokens.expiry.map(|e| e.at);
                let newer = match (theirs, ours) {
                    (Some(t), Some(o)) => o > t,
                    (None, Some(_)) => true,
                    _ => false,
                };
                if !newer && !force {
                    return Err(ImportError::Newer {
                        theirs: theirs.map_or_else(|| "at an unknown time".into(), format_rfc3339),
                    });
                }
            }
            // A damaged value, or tokens sealed with another key (a key
            // rotation): `--force` is the way to replace them.
            Err(StoreError::Invalid { reason, .. }) if !force => return Err(ImportError::Unreadable { reason }),
            Err(e @ StoreError::TooLarge { .. }) if !force => {
                return Err(ImportError::Unreadable { reason: e.to_string() })
            }
            Err(StoreError::Invalid { .. } | StoreError::TooLarge { .. }) => {
                warn!(key = %inner.keys.tokens, "replacing a stored value this profile cannot read (--force)");
            }
            Err(e) => return Err(e.into()),
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                inner.keys.tokens.as_str(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::put(inner.keys.tokens.as_str(), value, None)]);
        let done = inner.track(client.txn(txn).await)?;
        if done.succeeded() {
            Ok(Imported::Replaced)
        } else {
            Err(StoreError::Conflict { location: inner.loc() }.into())
        }
    }

    /// Seals tokens stored unsealed with the configured key (once, when a
    /// key is added to a credential already in etcd), by a compare-and-swap
    /// on what was read. Returns whether anything was written.
    pub async fn seal(&self) -> Result<bool, StoreError> {
        let inner = &self.inner;
        if inner.settings.encryption_key.is_none() {
            return Err(StoreError::Invalid {
                location: inner.loc(),
                reason: "this profile has no encryption_key_file to seal with".into(),
            });
        }
        let mut client = inner.client().await?;
        let current = inner.track(client.get(inner.keys.tokens.as_str(), None).await)?;
        let Some(kv) = current.kvs().first() else {
            return Err(StoreError::NotFound { location: inner.loc() });
        };
        if serde_json::from_slice::<Envelope>(kv.value()).is_ok_and(|e| e.sealed.is_some()) {
            // Already sealed: it must open with our key.
            inner.decode(kv.value())?;
            return Ok(false);
        }
        let tokens = inner.decode_with(kv.value(), true)?;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                inner.keys.tokens.as_str(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::put(inner.keys.tokens.as_str(), inner.encode(&tokens)?, None)]);
        if inner.track(client.txn(txn).await)?.succeeded() {
            Ok(true)
        } else {
            Err(StoreError::Conflict { location: inner.loc() })
        }
    }

    /// The lock holder, the generation, the expiry and any refresh in
    /// progress, without secrets.
    pub async fn fleet_status(&self) -> Result<FleetStatus, StoreError> {
        let inner = &self.inner;
        let mut client = inner.client().await?;
        let tokens = inner.track(client.get(inner.keys.tokens.as_str(), None).await)?;
        let lock = inner.track(client.get(inner.keys.lock.as_str(), None).await)?;
        let record = inner.track(client.get(inner.keys.record.as_str(), None).await)?;
        let mut status = FleetStatus {
            tokens_key: inner.keys.tokens.clone(),
            present: false,
            generation: 0,
            revision: 0,
            expires_at: None,
            last_refresh: None,
            sealed: false,
            access_fingerprint: None,
            lock_holder: None,
            refreshing: None,
            unreadable: None,
        };
        if let Some(kv) = tokens.kvs().first() {
            status.present = true;
            status.generation = kv.version();
            status.revision = kv.mod_revision();
            status.sealed = serde_json::from_slice::<Envelope>(kv.value()).is_ok_and(|e| e.sealed.is_some());
            // Unreadable tokens are what an operator runs this to find
            // out about: the lock and the record are still shown.
            match inner.decode(kv.value()) {
                Ok(set) => {
                    status.expires_at = set.expiry.map(|e| e.at);
                    status.last_refresh = set.last_refresh;
                    status.access_fingerprint = Some(set.access_token.fingerprint());
                }
                Err(StoreError::Invalid { reason, .. }) => status.unreadable = Some(reason),
                Err(e @ StoreError::TooLarge { .. }) => status.unreadable = Some(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        // Values from etcd reach a terminal: one word each, no control
        // characters (no escape sequence, no forged line).
        if let Some(kv) = lock.kvs().first() {
            status.lock_holder = Some(match serde_json::from_slice::<LockValue>(kv.value()) {
                Ok(v) => format!(
                    "{} pid {} since {}",
                    one_word(&v.holder.host),
                    v.holder.pid,
                    one_word(&v.since)
                ),
                Err(_) => "an unknown holder".into(),
            });
        }
        if let Some(kv) = record.kvs().first() {
            status.refreshing = Some(match serde_json::from_slice::<RecordValue>(kv.value()) {
                Ok(v) => format!(
                    "by {} pid {} since {} (from revision {}, its request ends by {})",
                    one_word(&v.holder.host),
                    v.holder.pid,
                    one_word(&v.started),
                    v.revision,
                    one_word(&v.deadline)
                ),
                Err(_) => "a record that cannot be read".into(),
            });
        }
        Ok(status)
    }
}

/// A host name for a message: one word, no control characters.
fn one_word(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic()).take(64).collect()
}

impl Inner {
    fn loc(&self) -> Location {
        Location::named(self.location.clone())
    }

    fn backend(&self, e: etcd_client::Error) -> StoreError {
        self.unavailable.store(true, Ordering::Relaxed);
        if is_auth_token_error(&e) {
            self.reauthenticate.store(true, Ordering::SeqCst);
        }
        StoreError::backend(self.loc(), EtcdFailure(redact(&e)))
    }

    /// Notes the outcome of an etcd request.
    fn track<T>(&self, result: Result<T, etcd_client::Error>) -> Result<T, StoreError> {
        match result {
            Ok(v) => {
                self.unavailable.store(false, Ordering::Relaxed);
                Ok(v)
            }
            Err(e) => Err(self.backend(e)),
        }
    }

    async fn client(&self) -> Result<Client, StoreError> {
        let s = &self.settings;
        let client = self
            .client
            .get_or_try_init(|| async {
                let mut options = ConnectOptions::new()
                    .with_connect_timeout(s.request_timeout)
                    .with_timeout(s.request_timeout)
                    .with_keep_alive(Duration::from_secs(10), s.request_timeout)
                    .with_require_leader(true);
                if let Some((user, password)) = &s.user {
                    options = options.with_user(user.clone(), password.expose().to_owned());
                }
                if let Some(tls) = &s.tls {
                    let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
                    if let Some((cert, key)) = &tls.identity_pem {
                        t = t.identity(Identity::from_pem(cert, key));
                    }
                    if let Some(domain) = &tls.domain {
                        t = t.domain_name(domain.clone());
                    }
                    options = options.with_tls(t);
                }
                Client::connect(s.endpoints.clone(), Some(options)).await
            })
            .await;
        let client = self.track(client.cloned())?;
        // etcd's auth tokens expire (`--auth-token-ttl`, 5 min by default)
        // and vanish when the cluster restarts; the client authenticates
        // only when it connects. Every clone (the lock's keep-alive, the
        // watch) shares the token, so one new token serves them all.
        if s.user.is_some() && self.reauthenticate.swap(false, Ordering::SeqCst) {
            if let Err(e) = client.refresh_token().await {
                self.reauthenticate.store(true, Ordering::SeqCst);
                return Err(self.backend(e));
            }
            info!(prefix = %s.prefix, "authenticated to etcd again");
        }
        Ok(client)
    }

    /// The value to store for `tokens`.
    fn encode(&self, tokens: &TokenSet) -> Result<Vec<u8>, StoreError> {
        let plain = StoredTokens {
            access_token: tokens.access_token.expose().to_owned(),
            refresh_token: tokens.refresh_token.as_ref().map(|t| t.expose().to_owned()),
            id_token: tokens.id_token.as_ref().map(|t| t.expose().to_owned()),
            account_id: tokens.account_id.clone(),
            expires_at: tokens.expiry.map(|e| format_rfc3339(e.at)),
            last_refresh: tokens.last_refresh.map(format_rfc3339),
        };
        let envelope = match &self.settings.encryption_key {
            None => Envelope {
                format: FORMAT.into(),
                tokens: Some(plain),
                sealed: None,
            },
            Some(key) => {
                let json = serde_json::to_vec(&plain).map_err(|e| self.write_error(e.to_string()))?;
                let mut nonce = [0u8; 24];
                getrandom::fill(&mut nonce).map_err(|e| self.write_error(format!("no randomness: {e}")))?;
                let ciphertext = key
                    .cipher()
                    .encrypt(
                        XNonce::from_slice(&nonce),
                        Payload {
                            msg: &json,
                            aad: self.keys.tokens.as_bytes(),
                        },
                    )
                    .map_err(|_| self.write_error("sealing failed".into()))?;
                Envelope {
                    format: FORMAT.into(),
                    tokens: None,
                    sealed: Some(Sealed {
                        alg: "XChaCha20-Poly1305".into(),
                        key_id: key.id(),
                        nonce: STANDARD.encode(nonce),
                        ciphertext: STANDARD.encode(ciphertext),
                    }),
                }
            }
        };
        serde_json::to_vec(&envelope).map_err(|e| self.write_error(e.to_string()))
    }

    fn write_error(&self, cause: String) -> StoreError {
        StoreError::Write {
            location: self.loc(),
            cause,
        }
    }

    fn invalid(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Invalid {
            location: self.loc(),
            reason: reason.into(),
        }
    }

    /// The tokens in a stored value. Errors name what is wrong, never the
    /// value's text.
    fn decode(&self, value: &[u8]) -> Result<TokenSet, StoreError> {
        self.decode_with(value, false)
    }

    /// Like [`decode`](Self::decode); `allow_unsealed` also reads unsealed
    /// tokens when a key is configured (for `fleet seal` alone).
    fn decode_with(&self, value: &[u8], allow_unsealed: bool) -> Result<TokenSet, StoreError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(StoreError::TooLarge {
                location: self.loc(),
                size: value.len() as u64,
            });
        }
        let envelope: Envelope = serde_json::from_slice(value).map_err(|_| {
            self.invalid("the stored value is not token-broker's JSON (was it written by another tool?)")
        })?;
        if envelope.format != FORMAT {
            return Err(self.invalid("the stored value has an unknown format version"));
        }
        let plain: StoredTokens = match (envelope.tokens, envelope.sealed) {
            (Some(plain), None) => {
                // With a key, only sealed tokens are trusted: the seal also
                // proves who wrote them. Anyone who can write etcd but holds
                // no key could otherwise plant tokens of an account of their
                // own, and read every caller's requests.
                if self.settings.encryption_key.is_some() && !allow_unsealed {
                    return Err(self.invalid(
                        "the stored tokens are not sealed, and this profile has an encryption_key_file: \
                         unsealed tokens are not trusted (seal them once with `token-broker fleet seal`)",
                    ));
                }
                plain
            }
            (None, Some(sealed)) => {
                let Some(key) = &self.settings.encryption_key else {
                    return Err(self.invalid(
                        "the stored tokens are sealed, and this profile has no encryption_key_file to open them",
                    ));
                };
                if sealed.key_id != key.id() {
                    return Err(self.invalid(format!(
                        "the stored tokens are sealed with another key (key id {}, ours is {})",
                        one_word(&sealed.key_id),
                        key.id()
                    )));
                }
                let nonce = STANDARD
                    .decode(&sealed.nonce)
                    .ok()
                    .filter(|n| n.len() == 24)
                    .ok_or_else(|| self.invalid("the sealed value's nonce is damaged"))?;
                let ciphertext = STANDARD
                    .decode(&sealed.ciphertext)
                    .map_err(|_| self.invalid("the sealed value is damaged"))?;
                let json = key
                    .cipher()
                    .decrypt(
                        XNonce::from_slice(&nonce),
                        Payload {
                            msg: &ciphertext,
                            aad: self.keys.tokens.as_bytes(),
                        },
                    )
                    .map_err(|_| {
                        self.invalid("the sealed value does not open with our key (damaged, or moved from another key)")
                    })?;
                serde_json::from_slice(&json).map_err(|_| self.invalid("the sealed tokens are not valid JSON"))?
            }
            _ => return Err(self.invalid("the stored value holds neither tokens nor sealed tokens")),
        };
        let time = |what: &str, s: Option<String>| -> Result<Option<SystemTime>, StoreError> {
            match s {
                None => Ok(None),
                Some(s) => parse_rfc3339(&s)
                    .map(Some)
                    .ok_or_else(|| self.invalid(format!("`{what}` is not an RFC 3339 timestamp"))),
            }
        };
        let expires_at = time("expires_at", plain.expires_at)?;
        let last_refresh = time("last_refresh", plain.last_refresh)?;
        if plain.access_token.is_empty() {
            return Err(self.invalid("the stored access token is empty"));
        }
        let expiry =
            expiry_of(&plain.access_token, expires_at).map_err(|e| self.invalid(format!("access_token: {e}")))?;
        Ok(TokenSet {
            access_token: AccessToken::new(plain.access_token),
            refresh_token: plain.refresh_token.filter(|t| !t.is_empty()).map(RefreshToken::new),
            id_token: plain.id_token.map(IdToken::new),
            account_id: plain.account_id,
            expiry,
            last_refresh,
        })
    }

    /// Where this process spools rotated tokens for this prefix.
    fn spool_path(&self) -> Option<PathBuf> {
        use sha2::{Digest, Sha256};
        let dir = self.settings.spool_dir.as_ref()?;
        let mut hash = Sha256::new();
        for e in &self.settings.endpoints {
            hash.update(e.as_bytes());
            hash.update([0u8]);
        }
        hash.update(self.keys.tokens.as_bytes());
        let name: String = hash.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
        Some(dir.join(format!("{name}.spool.json")))
    }

    /// Durably writes the spool (0600, in a 0700 folder) before the value
    /// goes to etcd.
    fn write_spool(&self, replaces: i64, value: &[u8]) -> Result<(), StoreError> {
        let Some(path) = self.spool_path() else {
            return Ok(());
        };
        let spooled = Spooled {
            format: FORMAT.into(),
            endpoints: self.settings.endpoints.clone(),
            key: self.keys.tokens.clone(),
            replaces_revision: replaces,
            value: String::from_utf8_lossy(value).into_owned(),
        };
        let bytes = serde_json::to_vec(&spooled).map_err(|e| self.write_error(e.to_string()))?;
        let spool_error = |e: std::io::Error| StoreError::Write {
            location: Location::File(path.clone()),
            cause: format!("the spool file: {e}"),
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(spool_error)?;
        }
        let mut tmp = tempfile::Builder::new()
            .prefix(".spool")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .tempfile_in(dir)
            .map_err(spool_error)?;
        tmp.write_all(&bytes).map_err(spool_error)?;
        tmp.as_file().sync_all().map_err(spool_error)?;
        tmp.persist(&path).map_err(|e| spool_error(e.error))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn remove_spool(&self) {
        if let Some(path) = self.spool_path() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(error = %e, "could not remove the spool file"),
            }
        }
    }

    /// Lands a spooled write left by an earlier attempt (this process's or
    /// one killed before it could write to etcd): over exactly the revision
    /// it replaces, or not at all.
    async fn land_spool(&self, client: &mut Client) -> Result<(), StoreError> {
        let Some(path) = self.spool_path() else {
            return Ok(());
        };
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                warn!(error = %e, "could not read the spool file");
                return Ok(());
            }
        };
        let Ok(spooled) = serde_json::from_slice::<Spooled>(&bytes) else {
            warn!("the spool file cannot be read as a spooled write; leaving it for an operator");
            return Ok(());
        };
        if spooled.key != self.keys.tokens || spooled.endpoints != self.settings.endpoints {
            return Ok(());
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                self.keys.tokens.as_str(),
                CompareOp::Equal,
                spooled.replaces_revision,
            )])
            .and_then([TxnOp::put(
                self.keys.tokens.as_str(),
                spooled.value.clone().into_bytes(),
                None,
            )])
            .or_else([TxnOp::get(self.keys.tokens.as_str(), None)]);
        let done = self.track(client.txn(txn).await)?;
        if done.succeeded() {
            info!(key = %self.keys.tokens, "wrote the rotated tokens spooled by an earlier attempt");
        } else {
            // Written after all (a save whose answer was lost), or replaced.
            let current = done.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            let ours = self.decode(spooled.value.as_bytes()).ok();
            let stored = current.and_then(|v| self.decode(&v).ok());
            match (ours, stored) {
                (Some(ours), Some(stored)) if !ours.differs_from(&stored) => {
                    info!(key = %self.keys.tokens, "the spooled rotated tokens had been written already");
                }
                _ => error!(
                    key = %self.keys.tokens,
                    "spooled rotated tokens were never written, and someone else has since written the tokens key; keeping theirs"
                ),
            }
        }
        self.remove_spool();
        Ok(())
    }

    async fn load(&self) -> Result<Loaded, StoreError> {
        let mut client = self.client().await?;
        self.land_spool(&mut client).await?;
        let response = self.track(client.get(self.keys.tokens.as_str(), None).await)?;
        let Some(kv) = response.kvs().first() else {
            return Err(StoreError::NotFound { location: self.loc() });
        };
        let tokens = self.decode(kv.value())?;
        Ok(Loaded {
            tokens,
            version: Version::from_revision(kv.mod_revision() as u64),
        })
    }

    async fn save(&self, tokens: &TokenSet, expected: &Version) -> Result<Version, StoreError> {
        let Some(revision) = revision_of(expected) else {
            return Err(StoreError::Conflict { location: self.loc() });
        };
        let value = self.encode(tokens)?;
        self.write_spool(revision, &value)?;
        crate::failpoint::hit("etcd-after-spool");
        let mut client = self.client().await?;
        // Deliberately not requiring the lock: while the tokens are still at
        // the revision our refresh started from, our rotation is the only
        // valid one and must land, even after our lease lapsed.
        let txn = Txn::new()
            .when([Compare::mod_revision(
                self.keys.tokens.as_str(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(self.keys.tokens.as_str(), value, None)]);
        let done = self.track(client.txn(txn).await)?;
        self.remove_spool();
        if done.succeeded() {
            let at = done.header().map_or(0, |h| h.revision());
            Ok(Version::from_revision(at as u64))
        } else {
            Err(StoreError::Conflict { location: self.loc() })
        }
    }

    async fn lock(self: &Arc<Self>, timeout: Duration) -> Result<StoreLock, StoreError> {
        let deadline = Instant::now() + timeout;
        let mut client = self.client().await?;
        // While another broker holds the lock, wait for its key to go
        // before asking for a lease of our own (a waiter asks for none).
        loop {
            let current = self.track(client.get(self.keys.lock.as_str(), None).await)?;
            let at = current.header().map_or(0, |h| h.revision());
            let Some(kv) = current.kvs().first().filter(|kv| kv.lease() != 0) else {
                break;
            };
            let from = at.max(kv.mod_revision()) + 1;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::LockTimeout {
                    location: self.loc(),
                    waited: timeout,
                });
            }
            wait_for_delete(&mut client, &self.keys.lock, from, left.min(Duration::from_secs(1))).await;
        }
        let ttl = self.settings.lease_ttl.as_secs().max(5) as i64;
        let asked = Instant::now();
        let grant = self.track(client.lease_grant(ttl, None).await)?;
        let lease = grant.id();
        let valid_until = Arc::new(AtomicU64::new(0));
        let base = asked;
        let set_until = |until: &AtomicU64, from: Instant, secs: i64| {
            let at = from + Duration::from_secs(secs.max(0) as u64);
            until.store(
                at.saturating_duration_since(base).as_millis() as u64 + 1,
                Ordering::SeqCst,
            );
        };
        set_until(&valid_until, asked, grant.ttl());
        let value = serde_json::to_vec(&LockValue {
            holder: self.me.clone(),
            lease,
            since: format_rfc3339(SystemTime::now()),
        })
        .unwrap_or_default();
        let acquired = loop {
            let txn = Txn::new()
                .when([Compare::create_revision(self.keys.lock.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    self.keys.lock.as_str(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(self.keys.lock.as_str(), None)]);
            let done = match client.txn(txn).await {
                Ok(done) => done,
                Err(e) => {
                    revoke_later(client.clone(), lease);
                    return Err(self.backend(e));
                }
            };
            self.unavailable.store(false, Ordering::Relaxed);
            let at = done.header().map_or(0, |h| h.revision());
            if done.succeeded() {
                break at;
            }
            // Every lock of ours lives under a lease. A lock key without one
            // (an operator's `etcdctl put`, a restored backup, another tool)
            // is nobody's lock and would never go away by itself: remove it,
            // only while it is still that very key, and try again at once.
            let leaseless = done.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .filter(|kv| kv.lease() == 0)
                    .map(|kv| kv.mod_revision()),
                _ => None,
            });
            if let Some(stale) = leaseless {
                warn!(key = %self.keys.lock, "the lock key has no lease, so it is no broker's lock; removing it");
                let txn = Txn::new()
                    .when([
                        Compare::mod_revision(self.keys.lock.as_str(), CompareOp::Equal, stale),
                        Compare::lease(self.keys.lock.as_str(), CompareOp::Equal, 0),
                    ])
                    .and_then([TxnOp::delete(self.keys.lock.as_str(), None)]);
                if let Err(e) = client.txn(txn).await {
                    revoke_later(client.clone(), lease);
                    return Err(self.backend(e));
                }
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                revoke_later(client.clone(), lease);
                return Err(StoreError::LockTimeout {
                    location: self.loc(),
                    waited: timeout,
                });
            }
            // Wait for the holder's key to go (released, or its lease
            // lapsed), at most a second at a time.
            wait_for_delete(&mut client, &self.keys.lock, at + 1, left.min(Duration::from_secs(1))).await;
        };
        *self.held.lock() = Some(acquired);
        let keeper = tokio::spawn(keep_alive(
            client.clone(),
            lease,
            valid_until.clone(),
            base,
            self.settings.lease_ttl,
        ));
        Ok(StoreLock::new(EtcdLock {
            store: self.clone(),
            client,
            lease,
            revision: acquired,
            base,
            valid_until,
            keeper: Some(keeper),
        }))
    }

    async fn mark_refreshing(&self, refresh_token: &RefreshToken) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let Some(lock_revision) = *self.held.lock() else {
            return Err(StoreError::Conflict { location: self.loc() });
        };
        // The revision of the tokens whose refresh token this is.
        let current = self.track(client.get(self.keys.tokens.as_str(), None).await)?;
        let Some(kv) = current.kvs().first() else {
            return Err(StoreError::NotFound { location: self.loc() });
        };
        let stored = self.decode(kv.value())?;
        if stored.refresh_token.as_ref() != Some(refresh_token) {
            return Err(StoreError::Conflict { location: self.loc() });
        }
        let lease = self.lock_lease(&mut client).await?;
        let now = SystemTime::now();
        let record = RecordValue {
            holder: self.me.clone(),
            lease,
            revision: kv.mod_revision(),
            refresh_token_sha256: refresh_token.sha256_hex(),
            started: format_rfc3339(now),
            deadline: format_rfc3339(now + self.settings.quarantine),
        };
        let value = serde_json::to_vec(&record).map_err(|e| self.write_error(e.to_string()))?;
        let txn = Txn::new()
            .when([
                Compare::create_revision(self.keys.lock.as_str(), CompareOp::Equal, lock_revision),
                Compare::mod_revision(self.keys.tokens.as_str(), CompareOp::Equal, kv.mod_revision()),
            ])
            .and_then([TxnOp::put(self.keys.record.as_str(), value, None)]);
        let done = self.track(client.txn(txn).await)?;
        if done.succeeded() {
            Ok(())
        } else {
            // The lock is no longer ours, or the tokens moved: spend nothing.
            Err(StoreError::Conflict { location: self.loc() })
        }
    }

    /// The lease of the lock we hold, as its key says.
    async fn lock_lease(&self, client: &mut Client) -> Result<i64, StoreError> {
        let lock = self.track(client.get(self.keys.lock.as_str(), None).await)?;
        Ok(lock.kvs().first().map_or(0, |kv| kv.lease()))
    }

    async fn clear_refreshing(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let Some(lock_revision) = *self.held.lock() else {
            return Ok(());
        };
        // Only while the lock is ours: a holder that got in after our lease
        // lapsed may have written its own record.
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.keys.lock.as_str(),
                CompareOp::Equal,
                lock_revision,
            )])
            .and_then([TxnOp::delete(self.keys.record.as_str(), None)]);
        self.track(client.txn(txn).await)?;
        Ok(())
    }

    async fn interrupted_refresh(&self) -> Result<Option<RefreshRecord>, StoreError> {
        let mut client = self.client().await?;
        let response = self.track(client.get(self.keys.record.as_str(), None).await)?;
        let Some(kv) = response.kvs().first() else {
            return Ok(None);
        };
        let Ok(record) = serde_json::from_slice::<RecordValue>(kv.value()) else {
            warn!(key = %self.keys.record, "a refresh-in-progress record cannot be read; treating it as interrupted");
            return Ok(Some(RefreshRecord {
                refresh_token_sha256: String::new(),
                holder_alive: false,
                holder_pid: 0,
                mine: false,
            }));
        };
        let mine = record.holder == self.me;
        let alive = if mine {
            true
        } else {
            let lease_alive = record.lease != 0
                && self
                    .track(client.lease_time_to_live(record.lease, None).await)
                    .map(|r| r.ttl() > 0)?;
            let in_flight = parse_rfc3339(&record.deadline).is_some_and(|d| SystemTime::now() < d);
            if lease_alive || in_flight {
                true
            } else {
                // Quarantine: from when we first saw its lease gone, its
                // late write may still land.
                let mut gone = self.gone_since.lock();
                gone.retain(|rev, _| *rev >= kv.mod_revision());
                let since = *gone.entry(kv.mod_revision()).or_insert_with(Instant::now);
                since.elapsed() < self.settings.quarantine
            }
        };
        Ok(Some(RefreshRecord {
            refresh_token_sha256: record.refresh_token_sha256,
            holder_alive: alive,
            holder_pid: record.holder.pid,
            mine,
        }))
    }

    async fn record_refused(&self, key: &str) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let lease = self.track(client.lease_grant(REFUSAL_TTL_SECS, None).await)?;
        let at = format_rfc3339(SystemTime::now());
        self.track(
            client
                .put(
                    format!("{}{key}", self.keys.refused),
                    at,
                    Some(PutOptions::new().with_lease(lease.id())),
                )
                .await,
        )?;
        Ok(())
    }

    async fn refused_at(&self, key: &str) -> Result<Option<SystemTime>, StoreError> {
        let mut client = self.client().await?;
        let response = self.track(client.get(format!("{}{key}", self.keys.refused), None).await)?;
        Ok(response
            .kvs()
            .first()
            .and_then(|kv| std::str::from_utf8(kv.value()).ok().and_then(parse_rfc3339)))
    }

    /// A task that forwards watch events on the tokens key, re-watching
    /// after errors, with an event at each (re)start so nothing is missed.
    async fn watch(self: Arc<Self>, tx: tokio::sync::mpsc::Sender<Changed>) {
        let mut pause = Duration::from_millis(100);
        loop {
            if tx.is_closed() {
                return;
            }
            let watched = async {
                let mut client = self.client().await.ok()?;
                // A watch that (re)connects also tells that etcd is back.
                let now = self
                    .track(
                        client
                            .get(self.keys.tokens.as_str(), Some(GetOptions::new().with_count_only()))
                            .await,
                    )
                    .ok()?;
                let from = now.header().map_or(0, |h| h.revision()) + 1;
                let stream = client
                    .watch(
                        self.keys.tokens.as_str(),
                        Some(WatchOptions::new().with_start_revision(from)),
                    )
                    .await
                    .ok()?;
                Some(stream)
            };
            let stream = tokio::select! {
                s = watched => s,
                _ = tx.closed() => return,
            };
            if let Some(mut stream) = stream {
                pause = Duration::from_millis(100);
                // Whatever happened before the watch started is looked at.
                if tx.send(Changed).await.is_err() {
                    return;
                }
                loop {
                    let next = tokio::select! {
                        n = stream.next() => n,
                        _ = tx.closed() => return,
                    };
                    match next {
                        Some(Ok(response)) if response.canceled() => break,
                        Some(Ok(response)) => {
                            if !response.events().is_empty() && tx.send(Changed).await.is_err() {
                                return;
                            }
                        }
                        _ => break,
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = tx.closed() => return,
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }
}

/// Whether etcd refused a request for our auth token (expired, unknown
/// after a restart, or issued before an auth change), which a new token
/// cures.
fn is_auth_token_error(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let message = status.message();
            format!("{:?}", status.code()) == "Unauthenticated"
                || message.contains("invalid auth token")
                || message.contains("revision of auth store is old")
                || message.contains("user name is empty")
        }
        _ => false,
    }
}

/// Waits until `key` is deleted (from `revision` on), at most `wait`.
async fn wait_for_delete(client: &mut Client, key: &str, revision: i64, wait: Duration) {
    let watched = async {
        let Ok(mut stream) = client
            .watch(key, Some(WatchOptions::new().with_start_revision(revision)))
            .await
        else {
            tokio::time::sleep(wait).await;
            return;
        };
        while let Some(Ok(response)) = stream.next().await {
            if response.canceled() {
                return;
            }
            if response.events().iter().any(|e| e.event_type() == EventType::Delete) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(wait, watched).await;
}

/// Keeps the lease alive every third of its TTL, moving `valid_until`
/// (milliseconds after `base`, 0: never valid) to when the lease certainly
/// lasts: the keep-alive's send time plus the TTL granted.
async fn keep_alive(mut client: Client, lease: i64, valid_until: Arc<AtomicU64>, base: Instant, ttl: Duration) {
    let period = ttl / 3;
    loop {
        tokio::time::sleep(period).await;
        let sent = Instant::now();
        let renewed = async {
            let (mut keeper, mut stream) = match client.lease_keep_alive(lease).await {
                Ok(pair) => pair,
                Err(e) => {
                    // An expired auth token: a new one for the next try
                    // (the lease runs on its last grant meanwhile).
                    if is_auth_token_error(&e) {
                        let _ = client.refresh_token().await;
                    }
                    return None;
                }
            };
            keeper.keep_alive().await.ok()?;
            let response = match stream.message().await {
                Ok(response) => response?,
                Err(e) => {
                    if is_auth_token_error(&e) {
                        let _ = client.refresh_token().await;
                    }
                    return None;
                }
            };
            Some(response.ttl())
        };
        match tokio::time::timeout(period, renewed).await {
            Ok(Some(granted)) if granted > 0 => {
                let at = sent + Duration::from_secs(granted as u64);
                valid_until.store(
                    at.saturating_duration_since(base).as_millis() as u64 + 1,
                    Ordering::SeqCst,
                );
            }
            Ok(Some(_)) => {
                // The lease is gone: the lock is lost for good.
                valid_until.store(0, Ordering::SeqCst);
                return;
            }
            // No answer: the lease runs on its last grant; try again.
            _ => {}
        }
    }
}

/// Revokes `lease` in the background (its keys go with it).
fn revoke_later(mut client: Client, lease: i64) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ = client.lease_revoke(lease).await;
        });
    }
}

/// A held etcd lock: a key under a kept-alive lease.
struct EtcdLock {
    store: Arc<Inner>,
    client: Client,
    lease: i64,
    revision: i64,
    base: Instant,
    valid_until: Arc<AtomicU64>,
    keeper: Option<tokio::task::JoinHandle<()>>,
}

impl fmt::Debug for EtcdLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdLock")
            .field("key", &self.store.keys.lock)
            .field("revision", &self.revision)
            .finish()
    }
}

impl EtcdLock {
    fn until(&self) -> Option<Instant> {
        match self.valid_until.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(self.base + Duration::from_millis(ms - 1)),
        }
    }

    fn forget(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
        let mut held = self.store.held.lock();
        if *held == Some(self.revision) {
            *held = None;
        }
    }
}

impl HeldLock for EtcdLock {
    fn is_valid(&self) -> bool {
        self.until().is_some_and(|at| Instant::now() < at)
    }

    fn valid_for(&self) -> Option<Duration> {
        Some(
            self.until()
                .map_or(Duration::ZERO, |at| at.saturating_duration_since(Instant::now())),
        )
    }

    fn release(mut self: Box<Self>) -> StoreFuture<'static, Result<(), StoreError>> {
        self.forget();
        let mut client = self.client.clone();
        let lease = self.lease;
        let store = self.store.clone();
        Box::pin(async move {
            // Revoking the lease deletes the lock key with it.
            store.track(client.lease_revoke(lease).await).map(|_| ())
        })
    }
}

impl Drop for EtcdLock {
    fn drop(&mut self) {
        if self.keeper.is_some() {
            self.forget();
            revoke_later(self.client.clone(), self.lease);
        }
    }
}

/// An etcd failure, as its message (credentials in endpoints are refused
/// at configuration, and etcd's errors never carry values).
#[derive(Debug)]
struct EtcdFailure(String);

impl fmt::Display for EtcdFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "etcd is unavailable ({}); coordination_unavailable: nothing is spent until it returns",
            self.0
        )
    }
}

impl std::error::Error for EtcdFailure {}

/// etcd's error, on one line and bounded.
fn redact(e: &etcd_client::Error) -> String {
    let text = e.to_string();
    let line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    line.chars().take(200).collect()
}

fn revision_of(version: &Version) -> Option<i64> {
    match &version.0 {
        super::VersionRepr::Revision(r) => i64::try_from(*r).ok(),
        super::VersionRepr::Bytes(_) => None,
    }
}

impl Store for EtcdStore {
    fn location(&self) -> &str {
        &self.inner.location
    }

    fn load(&self) -> StoreFuture<'_, Result<Loaded, StoreError>> {
        Box::pin(self.inner.load())
    }

    fn save<'a>(&'a self, tokens: &'a TokenSet, expected: &'a Version) -> StoreFuture<'a, Result<Version, StoreError>> {
        Box::pin(self.inner.save(tokens, expected))
    }

    fn lock(&self, timeout: Duration) -> StoreFuture<'_, Result<StoreLock, StoreError>> {
        Box::pin(self.inner.lock(timeout))
    }

    fn changes(&self, _fallback_poll: Duration) -> Changes {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(self.inner.clone().watch(tx));
        }
        Changes::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }

    fn mark_refreshing<'a>(&'a self, refresh_token: &'a RefreshToken) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(self.inner.mark_refreshing(refresh_token))
    }

    fn clear_refreshing(&self) -> StoreFuture<'_, Result<(), StoreError>> {
        Box::pin(self.inner.clear_refreshing())
    }

    fn interrupted_refresh(&self) -> StoreFuture<'_, Result<Option<RefreshRecord>, StoreError>> {
        Box::pin(self.inner.interrupted_refresh())
    }

    fn record_refused<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(self.inner.record_refused(key))
    }

    fn refused_at<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Result<Option<SystemTime>, StoreError>> {
        Box::pin(self.inner.refused_at(key))
    }

    fn takeover(&self) -> Takeover {
        self.inner.settings.takeover
    }

    fn coordination_unavailable(&self) -> bool {
        self.inner.unavailable.load(Ordering::Relaxed)
    }

    fn codex_cli_may_refresh(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(key: Option<EncryptionKey>) -> EtcdStore {
        let mut s = EtcdSettings::new(["http://127.0.0.1:1"], "/tb/test").unwrap();
        if let Some(k) = key {
            s = s.encryption_key(k);
        }
        EtcdStore::new(s)
    }

    fn tokens() -> TokenSet {
        let mut t = TokenSet::new("access-secret-1", Some("refresh-secret-1")).unwrap();
        t.account_id = Some("acct".into());
        t.last_refresh = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        t
    }

    #[test]
    fn plain_values_round_trip() {
        let s = store(None);
        let v = s.inner.encode(&tokens()).unwrap();
        assert!(!s.inner.decode(&v).unwrap().differs_from(&tokens()));
        assert_eq!(s.inner.decode(&v).unwrap().account_id.as_deref(), Some("acct"));
    }

    #[test]
    fn sealed_values_hold_no_token_and_need_the_key() {
        let key = EncryptionKey::from_bytes([7; 32]);
        let s = store(Some(key));
        let v = s.inner.encode(&tokens()).unwrap();
        let text = String::from_utf8_lossy(&v);
        assert!(!text.contains("secret"), "{text}");
        assert!(!s.inner.decode(&v).unwrap().differs_from(&tokens()));
        // Another key, and no key: typed errors that quote nothing.
        let other = store(Some(EncryptionKey::from_bytes([8; 32])));
        let e = other.inner.decode(&v).unwrap_err().to_string();
        assert!(e.contains("another key") && !e.contains("secret"), "{e}");
        let none = store(None);
        assert!(none
            .inner
            .decode(&v)
            .unwrap_err()
            .to_string()
            .contains("encryption_key_file"));
        // A value moved to another key name does not open.
        let moved = EtcdStore::new(
            EtcdSettings::new(["http://127.0.0.1:1"], "/tb/other")
                .unwrap()
                .encryption_key(EncryptionKey::from_bytes([7; 32])),
        );
        assert!(moved
            .inner
            .decode(&v)
            .unwrap_err()
            .to_string()
            .contains("does not open"));
    }

    #[test]
    fn garbage_values_are_typed_errors() {
        let s = store(None);
        for bad in [
            &b""[..],
            b"{",
            b"{\"format\":\"x\"}",
            b"{\"format\":\"token-broker-etcd/1\"}",
            b"[1]",
        ] {
            assert!(matches!(s.inner.decode(bad), Err(StoreError::Invalid { .. })));
        }
    }

    #[test]
    fn settings_refuse_bad_prefixes_and_endpoints() {
        assert!(EtcdSettings::new(["http://a:1"], "relative").is_err());
        assert!(EtcdSettings::new(["http://a:1"], "/a/../b").is_err());
        assert!(EtcdSettings::new(["http://user:pw@a:1"], "/a").is_err());
        assert!(EtcdSettings::new(["a:1"], "/a").is_err());
        assert!(EtcdSettings::new(Vec::<String>::new(), "/a").is_err());
        assert_eq!(EtcdSettings::new(["http://a:1"], "/a/b/").unwrap().prefix(), "/a/b");
    }

    #[test]
    fn key_files_must_be_private_and_hold_32_bytes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, STANDARD.encode([1u8; 32])).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(EncryptionKey::from_file(&path).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            EncryptionKey::from_file(&path).unwrap().id(),
            EncryptionKey::from_bytes([1; 32]).id()
        );
        std::fs::write(&path, "not a key at all, and secret").unwrap();
        let e = EncryptionKey::from_file(&path).unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }
}
