//! The configuration file: named profiles (one credential each) and the
//! daemon's settings, in TOML.
//!
//! Found at `--config PATH`, else `$TOKEN_BROKER_CONFIG`, else
//! `$XDG_CONFIG_HOME/token-broker/config.toml`, else
//! `~/.config/token-broker/config.toml`. A file named explicitly (the flag
//! or the variable) must exist; the default one may be absent. A missing
//! default file, or a file without profiles, means one profile, `default`,
//! with the Codex CLI's defaults.
//!
//! ```
//! use token_broker::server::config::Config;
//!
//! let config = Config::parse(
//!     r#"
//! [daemon]
//! socket = "/run/user/1000/token-broker.sock"
//!
//! [profiles.codex]
//! provider = "codex"
//! refresh_ahead = "10m"
//!
//! [profiles.corp]
//! provider = "oauth2"
//! auth_file = "/home/me/.config/corp/oauth.json"
//! token_url = "https://login.example.com/oauth2/token"
//! client_id = "my-client"
//! client_secret_env = "CORP_CLIENT_SECRET"
//! client_auth = "basic"
//! timeout = "30s"
//! "#,
//!     None,
//! )?;
//! assert_eq!(config.profiles.keys().collect::<Vec<_>>(), ["codex", "corp"]);
//! assert_eq!(config.daemon.socket.to_str(), Some("/run/user/1000/token-broker.sock"));
//! # Ok::<(), token_broker::server::config::ConfigError>(())
//! ```
//!
//! Errors name the file, the line and the key, and never quote a value
//! (someone may have pasted a secret where it does not belong).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::credentials::Secret;
use crate::defaults::{DEFAULT_HTTP_TIMEOUT, DEFAULT_REFRESH_AHEAD, DEFAULT_WINNER_WAIT};
use crate::provider::ClientAuth;
use crate::store::display_path;
use crate::{BrokerBuilder, BrokerError, Dialect, TokenBroker};

/// The variable naming the configuration file.
pub const CONFIG_ENV: &str = "TOKEN_BROKER_CONFIG";

/// The profile used when the configuration defines none.
pub const DEFAULT_PROFILE: &str = "default";

/// The longest profile name.
pub const MAX_PROFILE_NAME: usize = 64;

/// The largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Why a configuration could not be used. Never quotes a value from the
/// file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` or `$TOKEN_BROKER_CONFIG` does not exist.
    #[error("the configuration file {} does not exist", display_path(.path))]
    NotFound {
        /// The file.
        path: PathBuf,
    },
    /// The file could not be read.
    #[error("could not read the configuration file {}: {source}", display_path(.path))]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown key or a bad value.
    #[error("{}line {line}, column {column}: {message}", at(.path))]
    Parse {
        /// The file (`None`: text parsed without a file).
        path: Option<PathBuf>,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong (values are left out).
        message: String,
    },
    /// A setting is missing or contradicts another.
    #[error("{}{message}", at(.path))]
    Invalid {
        /// The file (`None`: text parsed without a file).
        path: Option<PathBuf>,
        /// What is wrong and what to do.
        message: String,
    },
}

fn at(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!("{}: ", display_path(p)),
        None => String::new(),
    }
}

/// A whole configuration: the daemon's settings and the profiles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from (`None`: no file, the defaults).
    pub source: Option<PathBuf>,
    /// The daemon's settings.
    pub daemon: DaemonConfig,
    /// The profiles by name (never empty).
    pub profiles: BTreeMap<String, Profile>,
    /// The auth-injecting proxies by name (`[proxies.NAME]`).
    pub proxies: BTreeMap<String, ProxyConfig>,
}

/// A `[proxies.NAME]` table: a local reverse proxy that puts a profile's
/// token on every request to `upstream` (see
/// [`proxy`](crate::server::proxy)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The profile whose token it sends.
    pub profile: String,
    /// Where it listens (loopback unless `allow_remote`).
    pub listen: std::net::SocketAddr,
    /// The upstream base URL; a request's path is appended to its path.
    pub upstream: String,
    /// Listen on a non-loopback address.
    pub allow_remote: bool,
    /// Clients must send the client key as their bearer token (default).
    pub require_client_key: bool,
    /// Request bodies up to this many bytes are kept, so that a request
    /// the upstream answers 401 can be sent again with a new token.
    pub retry_body_limit: usize,
    /// How long to wait for a connection to the upstream.
    pub connect_timeout: Duration,
    /// How long to wait for the upstream's response headers (a streamed
    /// body has no timeout once it flows).
    pub response_timeout: Duration,
    /// At most this many client connections at once.
    pub max_connections: usize,
    /// The most header fields an upstream's answer may have (HTTP/1.1;
    /// 1 to [`MAX_MAX_UPSTREAM_HEADERS`]); an answer with more is a 502
    /// `upstream_head_too_large`. The default, 100, is also the cheapest:
    /// see [`DEFAULT_MAX_UPSTREAM_HEADERS`].
    pub max_upstream_headers: usize,
}

impl ProxyConfig {
    /// A proxy of `profile` on `listen` to `upstream`, with every default.
    pub fn new(profile: impl Into<String>, listen: std::net::SocketAddr, upstream: impl Into<String>) -> Self {
        ProxyConfig {
            profile: profile.into(),
            listen,
            upstream: upstream.into(),
            allow_remote: false,
            require_client_key: true,
            retry_body_limit: DEFAULT_RETRY_BODY_LIMIT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_upstream_headers: DEFAULT_MAX_UPSTREAM_HEADERS,
        }
    }

    /// Checks the settings that do not depend on the profiles: a loopback
    /// `listen` unless `allow_remote`, an `https://` upstream unless its
    /// host is loopback, `max_connections` from 1 to
    /// [`MAX_MAX_CONNECTIONS`], `max_upstream_headers` from 1 to
    /// [`MAX_MAX_UPSTREAM_HEADERS`].
    pub fn check(&self) -> Result<(), String> {
        if self.max_connections == 0 || self.max_connections > MAX_MAX_CONNECTIONS {
            return Err(format!(
                "max_connections must be at least 1 and at most {MAX_MAX_CONNECTIONS}"
            ));
        }
        if self.max_upstream_headers == 0 || self.max_upstream_headers > MAX_MAX_UPSTREAM_HEADERS {
            return Err(format!(
                "max_upstream_headers must be at least 1 and at most {MAX_MAX_UPSTREAM_HEADERS}"
            ));
        }
        if self.allow_remote && !self.require_client_key {
            return Err(
                "allow_remote without a client key would hand the profile's token to anyone who can reach the port; \
                 keep require_client_key on"
                    .into(),
            );
        }
        if !self.allow_remote && !self.listen.ip().is_loopback() {
            return Err(format!(
                "listen {} is not a loopback address: anyone who can reach it would use the profile's token; \
                 set allow_remote = true if that is intended",
                self.listen
            ));
        }
        let url = reqwest::Url::parse(&self.upstream).map_err(|_| "upstream is not a URL".to_owned())?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err("upstream must not carry a user or password".into());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err("upstream must not have a query or fragment (the request's query is appended)".into());
        }
        match url.scheme() {
            "https" => Ok(()),
            "http" if crate::provider::is_loopback_url(&url) => Ok(()),
            "http" => {
                Err("upstream must be https:// unless its host is loopback (the token would travel in clear)".into())
            }
            _ => Err("upstream must be an http(s) URL".into()),
        }
    }
}

/// Request bodies kept for a retry after a 401, by default.
pub const DEFAULT_RETRY_BODY_LIMIT: usize = 1024 * 1024;
/// The proxy's connect timeout to the upstream, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the proxy waits for the upstream's response headers, by
/// default (a model's non-streamed answer can take minutes).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(600);
/// The proxy's client connections at once, by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The most `max_connections` may be (a larger "unlimited" would overflow
/// the proxy's semaphore, a panic that stops the proxy; no process has
/// that many descriptors anyway).
pub const MAX_MAX_CONNECTIONS: usize = 1_000_000;
/// The most header fields an upstream's answer may have, by default:
/// hyper's own cap, and real model APIs send a few dozen. It is also the
/// fast one: hyper parses a head into two arrays of the cap's size, on the
/// stack and untouched at its own default, but filled slot by slot, and
/// above 100 allocated, at every answer for any other cap.
pub const DEFAULT_MAX_UPSTREAM_HEADERS: usize = 100;
/// The most `max_upstream_headers` may be (each answer then costs two
/// vectors of that many slots).
pub const MAX_MAX_UPSTREAM_HEADERS: usize = 10_000;

/// The `[daemon]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The Unix socket it listens on. Default:
    /// `$XDG_RUNTIME_DIR/token-broker.sock`, else
    /// `~/.local/state/token-broker/token-broker.sock`.
    pub socket: PathBuf,
    /// Users besides the daemon's own who may connect. When not empty, the
    /// socket is mode 0666 in a folder others may traverse (0711) and the
    /// peer check on every connection keeps everyone else out.
    pub allowed_uids: Vec<u32>,
}

/// One named credential: how to build its broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// The provider's dialect.
    pub provider: Dialect,
    /// The credentials file (`None` for codex: as
    /// [`TokenBroker::codex`] finds it).
    pub auth_file: Option<PathBuf>,
    /// The token endpoint (required for oauth2).
    pub token_url: Option<String>,
    /// The OAuth client id (required for oauth2).
    pub client_id: Option<String>,
    /// The variable holding the client secret.
    pub client_secret_env: Option<String>,
    /// How an oauth2 client authenticates.
    pub client_auth: ClientAuthKind,
    /// Refresh this long before expiry.
    pub refresh_ahead: Duration,
    /// How long to wait for a winner's tokens after a refused refresh token.
    pub winner_wait: Duration,
    /// The timeout of one token request.
    pub timeout: Duration,
    /// Whether a long-running broker (the daemon) refreshes before expiry
    /// unasked. Default: true.
    pub keep_fresh: bool,
    /// Where the credential lives: its file (the default), or etcd
    /// (`store = "etcd"`).
    pub store: ProfileStore,
}

/// Where a profile's credential lives (`store`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ProfileStore {
    /// Its credentials file (`auth_file`, or the Codex CLI's).
    #[default]
    File,
    /// An etcd v3 cluster shared by a fleet of hosts (needs the `etcd`
    /// feature at run time).
    Etcd(Box<EtcdProfile>),
}

/// The etcd settings of a `store = "etcd"` profile. Secrets are never
/// values here: the password comes from a variable or a file, the
/// encryption key from a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdProfile {
    /// `etcd_endpoints`: `http(s)://host:port` of the members.
    pub endpoints: Vec<String>,
    /// `etcd_prefix`: the keys live under it.
    pub prefix: String,
    /// `etcd_user`.
    pub user: Option<String>,
    /// `etcd_password_env`: the variable holding the user's password.
    pub password_env: Option<String>,
    /// `etcd_password_file`: a file holding it.
    pub password_file: Option<PathBuf>,
    /// `etcd_ca_file`: PEM of the CA to trust (TLS).
    pub ca_file: Option<PathBuf>,
    /// `etcd_cert_file`: PEM client certificate (TLS client auth).
    pub cert_file: Option<PathBuf>,
    /// `etcd_key_file`: its PEM private key.
    pub key_file: Option<PathBuf>,
    /// `etcd_tls_domain`: the name in the members' certificates.
    pub tls_domain: Option<String>,
    /// `encryption_key_file`: seals the tokens at rest.
    pub encryption_key_file: Option<PathBuf>,
    /// `spool_dir`: where rotated tokens wait to reach etcd (default:
    /// the state folder's `spool`).
    pub spool_dir: Option<PathBuf>,
    /// `takeover`: `wait` (default) or `retry-once`.
    pub takeover: crate::store::Takeover,
    /// `lease_ttl`: the lock's lease (default: 30 s, or twice the timeout
    /// plus a second when that is longer: 62 s with the default 30 s).
    pub lease_ttl: Duration,
}

/// token-broker's state folder: `$XDG_STATE_HOME/token-broker`, else
/// `~/.local/state/token-broker` (`None` when neither variable is set).
pub fn state_dir() -> Option<PathBuf> {
    let var = |v: &str| std::env::var_os(v).filter(|v| !v.is_empty()).map(PathBuf::from);
    match var("XDG_STATE_HOME").filter(|p| p.is_absolute()) {
        Some(state) => Some(state.join("token-broker")),
        None => Some(var("HOME")?.join(".local").join("state").join("token-broker")),
    }
}

/// How an oauth2 client authenticates (`client_auth`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthKind {
    /// A public client: `client_id` in the form.
    #[default]
    None,
    /// `client_secret_basic`.
    Basic,
    /// `client_secret_post`.
    Post,
}

impl Profile {
    /// A codex profile with every default (what `token-broker serve` serves
    /// without a configuration file).
    pub fn codex_defaults() -> Self {
        Profile {
            provider: Dialect::Codex,
            auth_file: None,
            token_url: None,
            client_id: None,
            client_secret_env: None,
            client_auth: ClientAuthKind::None,
            refresh_ahead: DEFAULT_REFRESH_AHEAD,
            winner_wait: DEFAULT_WINNER_WAIT,
            timeout: DEFAULT_HTTP_TIMEOUT,
            keep_fresh: true,
            store: ProfileStore::File,
        }
    }

    /// The broker builder for this profile. Reads the client secret from
    /// its variable now; fails with [`BrokerError::Config`] when the
    /// variable is unset or empty.
    pub fn builder(&self) -> Result<BrokerBuilder, BrokerError> {
        let mut builder = match self.provider {
            Dialect::Codex => TokenBroker::codex(),
            Dialect::OAuth2 => {
                let (Some(url), Some(id)) = (&self.token_url, &self.client_id) else {
                    return Err(BrokerError::Config(
                        "an oauth2 profile needs token_url and client_id".into(),
                    ));
                };
                TokenBroker::oauth2(url, id)
            }
        };
        if let Some(url) = &self.token_url {
            builder = builder.token_url(url);
        }
        if let Some(id) = &self.client_id {
            builder = builder.client_id(id);
        }
        if let Some(path) = &self.auth_file {
            builder = builder.credentials_path(path);
        }
        if let ProfileStore::Etcd(etcd) = &self.store {
            builder = builder.store(self.etcd_store(etcd)?);
        }
        let auth = match self.client_auth {
            ClientAuthKind::None => ClientAuth::None,
            ClientAuthKind::Basic => ClientAuth::Basic(self.secret()?),
            ClientAuthKind::Post => ClientAuth::Post(self.secret()?),
        };
        Ok(builder
            .client_auth(auth)
            .refresh_ahead(self.refresh_ahead)
            .winner_wait(self.winner_wait)
            .http_timeout(self.timeout)
            .keep_fresh(self.keep_fresh))
    }

    /// What identifies the credential this profile names, as this process
    /// resolves it: the dialect, the credentials file (absolute, with
    /// symlinks resolved when it exists; for codex without `auth_file`, as
    /// `CODEX_HOME` or `HOME` says here), the token endpoint and the client
    /// id, hashed (SHA-256, hex). A client sends it with its requests; the
    /// daemon answers only when its own profile of that name resolves to
    /// the same, so that a name never stands for another credential than
    /// the caller's configuration says.
    pub fn credential_id(&self) -> String {
        use sha2::{Digest, Sha256};
        use std::os::unix::ffi::OsStrExt;
        let codex = self.provider == Dialect::Codex;
        let path = match &self.auth_file {
            Some(path) => Some(path.clone()),
            None if codex => crate::store::CodexAuthFile::default_path(),
            None => None,
        }
        .map(|p| {
            std::fs::canonicalize(&p)
                .or_else(|_| std::path::absolute(&p))
                .unwrap_or(p)
        });
        let token_url = match &self.token_url {
            Some(url) => Some(url.clone()),
            None if codex => Some(
                std::env::var(crate::provider::CODEX_TOKEN_URL_ENV)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| crate::provider::CODEX_TOKEN_URL.to_owned()),
            ),
            None => None,
        };
        let client_id = match &self.client_id {
            Some(id) => Some(id.clone()),
            None if codex => Some(crate::provider::CODEX_CLIENT_ID.to_owned()),
            None => None,
        };
        let mut hash = Sha256::new();
        let place = match &self.store {
            ProfileStore::File => path.as_ref().map_or(Vec::new(), |p| p.as_os_str().as_bytes().to_vec()),
            ProfileStore::Etcd(etcd) => format!("etcd\0{}\0{}", etcd.endpoints.join(","), etcd.prefix).into_bytes(),
        };
        let parts: [&[u8]; 4] = [
            if codex { b"codex" } else { b"oauth2" },
            &place,
            token_url.as_deref().unwrap_or("").as_bytes(),
            client_id.as_deref().unwrap_or("").as_bytes(),
        ];
        for part in parts {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The etcd store of an etcd profile.
    #[cfg(feature = "etcd")]
    fn etcd_store(&self, etcd: &EtcdProfile) -> Result<std::sync::Arc<dyn crate::store::Store>, BrokerError> {
        Ok(std::sync::Arc::new(crate::store::EtcdStore::new(
            self.etcd_settings(etcd)?,
        )))
    }

    #[cfg(not(feature = "etcd"))]
    fn etcd_store(&self, _etcd: &EtcdProfile) -> Result<std::sync::Arc<dyn crate::store::Store>, BrokerError> {
        Err(BrokerError::Config(
            "this profile keeps its credential in etcd (store = \"etcd\"), and this token-broker was built \
             without etcd support: build it with `--features etcd`"
                .into(),
        ))
    }

    /// The etcd store's settings for an etcd profile: reads the password,
    /// the TLS files and the encryption key now. Errors name the setting
    /// and the file, never a secret.
    #[cfg(feature = "etcd")]
    pub fn etcd_settings(&self, etcd: &EtcdProfile) -> Result<crate::store::EtcdSettings, BrokerError> {
        use crate::store::{EncryptionKey, EtcdSettings, EtcdTls};
        let config = |m: String| BrokerError::Config(m);
        let mut settings = EtcdSettings::new(etcd.endpoints.iter().cloned(), &etcd.prefix).map_err(config)?;
        settings = settings
            .takeover(etcd.takeover)
            .lease_ttl(etcd.lease_ttl)
            .quarantine(self.timeout + crate::defaults::TIMEOUT_GRACE + Duration::from_secs(5));
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| config(format!("{what} {}: {e}", display_path(path))))
        };
        if let Some(user) = &etcd.user {
            let password = match (&etcd.password_env, &etcd.password_file) {
                (Some(var), _) => match std::env::var(var) {
                    Ok(v) if !v.is_empty() => v,
                    _ => {
                        return Err(config(format!(
                            "the variable {var} (etcd_password_env) is not set or empty"
                        )))
                    }
                },
                (None, Some(path)) => {
                    use std::os::unix::fs::MetadataExt;
                    let private = std::fs::metadata(path).is_ok_and(|m| m.mode() & 0o077 == 0);
                    if !private && path.exists() {
                        return Err(config(format!(
                            "the etcd_password_file {} is readable by others; chmod 600 it",
                            display_path(path)
                        )));
                    }
                    let bytes = read("etcd_password_file", path)?;
                    String::from_utf8_lossy(&bytes)
                        .trim_end_matches(['\r', '\n'])
                        .to_owned()
                }
                (None, None) => return Err(config("etcd_user needs etcd_password_env or etcd_password_file".into())),
            };
            settings = settings.user(user.clone(), Secret::new(password));
        }
        if let Some(ca) = &etcd.ca_file {
            let identity_pem = match (&etcd.cert_file, &etcd.key_file) {
                (Some(cert), Some(key)) => Some((read("etcd_cert_file", cert)?, read("etcd_key_file", key)?)),
                _ => None,
            };
            settings = settings.tls(EtcdTls {
                ca_pem: read("etcd_ca_file", ca)?,
                identity_pem,
                domain: etcd.tls_domain.clone(),
            });
        }
        if let Some(path) = &etcd.encryption_key_file {
            settings = settings.encryption_key(EncryptionKey::from_file(path).map_err(config)?);
        }
        let spool = etcd.spool_dir.clone().or_else(|| state_dir().map(|d| d.join("spool")));
        if let Some(dir) = spool {
            settings = settings.spool_dir(dir);
        }
        Ok(settings)
    }

    fn secret(&self) -> Result<Secret, BrokerError> {
        let var = self
            .client_secret_env
            .as_deref()
            .ok_or_else(|| BrokerError::Config("client_auth basic or post needs client_secret_env".into()))?;
        match std::env::var(var) {
            Ok(value) if !value.is_empty() => Ok(Secret::new(value)),
            // A name that is not UPPER_SNAKE may be the secret itself,
            // pasted where its variable's name belongs: not shown.
            _ if looks_like_a_variable(var) => Err(BrokerError::Config(format!(
                "the environment variable {var} (client_secret_env) is not set or empty"
            ))),
            _ => Err(BrokerError::Config(
                "the environment variable client_secret_env names is not set or empty \
                 (it names the variable holding the secret, not the secret)"
                    .into(),
            )),
        }
    }
}

/// Whether `var` looks like an environment variable's name, as they are
/// written (`CORP_CLIENT_SECRET`), so that an error may show it.
fn looks_like_a_variable(var: &str) -> bool {
    var.len() <= 64
        && var
            .bytes()
            .all(|b| b == b'_' || b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// Where the configuration comes from, in the documented order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigPath {
    /// Named by `--config` or `$TOKEN_BROKER_CONFIG`: must exist.
    Explicit(PathBuf),
    /// The default place: may be absent.
    Default(PathBuf),
    /// No place can be named (neither `XDG_CONFIG_HOME` nor `HOME`).
    None,
}

impl ConfigPath {
    /// `flag`, else `$TOKEN_BROKER_CONFIG`, else
    /// `$XDG_CONFIG_HOME/token-broker/config.toml`, else
    /// `~/.config/token-broker/config.toml`.
    pub fn locate(flag: Option<&Path>) -> Self {
        if let Some(path) = flag {
            return ConfigPath::Explicit(path.to_path_buf());
        }
        if let Some(path) = env_path(CONFIG_ENV) {
            return ConfigPath::Explicit(path);
        }
        if let Some(dir) = env_path("XDG_CONFIG_HOME").filter(|p| p.is_absolute()) {
            return ConfigPath::Default(dir.join("token-broker").join("config.toml"));
        }
        match env_path("HOME") {
            Some(home) => ConfigPath::Default(home.join(".config").join("token-broker").join("config.toml")),
            None => ConfigPath::None,
        }
    }
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

impl Config {
    /// Loads the configuration from where [`ConfigPath::locate`] says.
    pub fn load(flag: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_from(ConfigPath::locate(flag))
    }

    /// Loads the configuration from `place`.
    pub fn load_from(place: ConfigPath) -> Result<Config, ConfigError> {
        let (path, explicit) = match place {
            ConfigPath::Explicit(p) => (p, true),
            ConfigPath::Default(p) => (p, false),
            ConfigPath::None => return Config::parse("", None),
        };
        let text = match read_bounded(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Config::parse("", None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ConfigError::NotFound { path }),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        Config::parse(&text, Some(&path))
    }

    /// Parses configuration text; `path` is the file it came from, for
    /// messages and to resolve relative paths (against its folder).
    pub fn parse(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| parse_error(text, path, &e))?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.map(Path::to_path_buf),
            message,
        };
        let base = path.and_then(Path::parent).map(Path::to_path_buf);
        let resolve = |p: &str| -> Result<PathBuf, String> { resolve_path(p, base.as_deref()) };
        let socket = match raw.daemon.socket {
            Some(s) => resolve(&s).map_err(|m| invalid(format!("[daemon] socket: {m}")))?,
            None => default_socket().ok_or_else(|| {
                invalid("[daemon] socket: neither XDG_RUNTIME_DIR nor HOME is set; set socket".into())
            })?,
        };
        let mut profiles = BTreeMap::new();
        for (name, raw) in raw.profiles {
            check_profile_name(&name).map_err(|m| invalid(format!("[profiles.{}]: {m}", shown_name(&name))))?;
            let profile = raw
                .into_profile(&resolve)
                .map_err(|m| invalid(format!("[profiles.{name}] {m}")))?;
            profiles.insert(name, profile);
        }
        if profiles.is_empty() {
            profiles.insert(DEFAULT_PROFILE.to_owned(), Profile::codex_defaults());
        }
        let mut proxies = BTreeMap::new();
        let mut listening = std::collections::HashMap::new();
        for (name, raw) in raw.proxies {
            check_profile_name(&name).map_err(|m| {
                invalid(format!(
                    "[proxies.{}]: {}",
                    name.escape_debug(),
                    m.replace("profile", "proxy")
                ))
            })?;
            let proxy = raw.into_proxy().map_err(|m| invalid(format!("[proxies.{name}] {m}")))?;
            if !profiles.contains_key(&proxy.profile) {
                return Err(invalid(format!(
                    "[proxies.{name}] profile {:?} is not a profile of this configuration",
                    proxy.profile
                )));
            }
            if let Some(other) = listening.insert(proxy.listen, name.clone()) {
                return Err(invalid(format!(
                    "[proxies.{name}] listens on {} as [proxies.{other}] does",
                    proxy.listen
                )));
            }
            proxies.insert(name, proxy);
        }
        Ok(Config {
            source: path.map(Path::to_path_buf),
            daemon: DaemonConfig {
                socket,
                allowed_uids: raw.daemon.allowed_uids,
            },
            profiles,
            proxies,
        })
    }

    /// The profile named `name`, or an error naming the profiles there are.
    pub fn profile(&self, name: &str) -> Result<&Profile, ConfigError> {
        self.profiles.get(name).ok_or_else(|| ConfigError::Invalid {
            path: self.source.clone(),
            message: format!(
                "no profile named {name:?} (profiles: {})",
                self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })
    }
}

/// The default socket: `$XDG_RUNTIME_DIR/token-broker.sock`, else
/// `~/.local/state/token-broker/token-broker.sock`.
pub fn default_socket() -> Option<PathBuf> {
    if let Some(dir) = env_path("XDG_RUNTIME_DIR").filter(|p| p.is_absolute()) {
        return Some(dir.join("token-broker.sock"));
    }
    env_path("HOME").map(|home| {
        home.join(".local")
            .join("state")
            .join("token-broker")
            .join("token-broker.sock")
    })
}

/// Whether `name` can name a profile: 1 to 64 of `A-Z a-z 0-9 _ - .`, not
/// starting with a dot (it is a URL path segment and a metrics label).
pub fn check_profile_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_PROFILE_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a profile name is 1 to {MAX_PROFILE_NAME} letters, digits, '_', '-' or '.', not starting with '.'"
        ))
    }
}

/// A bad profile name as an error shows it: escaped, and only when it is
/// short, as a key is (a long one may be a secret pasted as a table name).
fn shown_name(name: &str) -> String {
    let length = name.chars().count();
    if length <= 32 {
        name.escape_debug().to_string()
    } else {
        format!("… (a name of {length} characters)")
    }
}

fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {} KiB", MAX_CONFIG_BYTES / 1024),
        ));
    }
    Ok(text)
}

/// `~/x` against `$HOME`, a relative path against the configuration's
/// folder.
fn resolve_path(text: &str, base: Option<&Path>) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("is empty".into());
    }
    if text.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if let Some(rest) = text.strip_prefix("~/").or(if text == "~" { Some("") } else { None }) {
        let home = env_path("HOME").ok_or("starts with ~ but HOME is not set")?;
        return Ok(home.join(rest));
    }
    let path = PathBuf::from(text);
    Ok(match base {
        Some(base) if path.is_relative() => base.join(path),
        _ => path,
    })
}

/// A TOML error as line, column and message, without the source line
/// (which may hold a secret pasted in the wrong place) or quoted values.
fn parse_error(text: &str, path: Option<&Path>, e: &toml::de::Error) -> ConfigError {
    let offset = e.span().map_or(0, |s| s.start).min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    ConfigError::Parse {
        path: path.map(Path::to_path_buf),
        line,
        column,
        message: without_quoted_values(e.message().trim()),
    }
}

/// A serde message without the values it quotes: serde puts a rejected
/// value in double quotes (`invalid type: string "..."`) or, for an enum,
/// in backticks (``unknown variant `...` ``); key names are in backticks
/// and stay, unless they do not look like a key (a secret pasted as one).
fn without_quoted_values(message: &str) -> String {
    let variant = message.starts_with("unknown variant");
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    let mut first_backtick = true;
    while let Some(i) = rest.find(['"', '`']) {
        let quote = rest.as_bytes()[i] as char;
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(end) = after.find(quote) else {
            // Unbalanced: drop the rest rather than risk a value.
            out.push(quote);
            out.push('…');
            return out;
        };
        let inner = &after[..end];
        let keyish = inner.len() <= MAX_SHOWN_KEY
            && inner
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
        let keep = quote == '`' && keyish && !(variant && first_backtick);
        if quote == '`' {
            first_backtick = false;
        }
        out.push(quote);
        out.push_str(if keep { inner } else { "…" });
        out.push(quote);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The longest unknown key an error names (the longest setting,
/// `client_secret_env`, has 17 characters; secrets are longer).
const MAX_SHOWN_KEY: usize = 24;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    profiles: BTreeMap<String, RawProfile>,
    #[serde(default)]
    proxies: BTreeMap<String, RawProxy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    profile: String,
    listen: String,
    upstream: String,
    #[serde(default)]
    allow_remote: bool,
    #[serde(default = "yes")]
    require_client_key: bool,
    retry_body_limit: Option<usize>,
    #[serde(default, deserialize_with = "connect_timeout")]
    connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "response_timeout")]
    response_timeout: Option<Duration>,
    max_connections: Option<usize>,
    max_upstream_headers: Option<usize>,
}

fn yes() -> bool {
    true
}

impl RawProxy {
    fn into_proxy(self) -> Result<ProxyConfig, String> {
        let listen = self
            .listen
            .parse()
            .map_err(|_| "listen must be an address and port, such as 127.0.0.1:8788".to_owned())?;
        let proxy = ProxyConfig {
            profile: self.profile,
            listen,
            upstream: self.upstream,
            allow_remote: self.allow_remote,
            require_client_key: self.require_client_key,
            retry_body_limit: self.retry_body_limit.unwrap_or(DEFAULT_RETRY_BODY_LIMIT),
            connect_timeout: self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            response_timeout: self.response_timeout.unwrap_or(DEFAULT_RESPONSE_TIMEOUT),
            max_connections: self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_upstream_headers: self.max_upstream_headers.unwrap_or(DEFAULT_MAX_UPSTREAM_HEADERS),
        };
        // The ranges are checked there, as for a config made in code.
        proxy.check()?;
        Ok(proxy)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    socket: Option<String>,
    #[serde(default)]
    allowed_uids: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawDialect {
    Codex,
    Oauth2,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    provider: RawDialect,
    auth_file: Option<String>,
    token_url: Option<String>,
    client_id: Option<String>,
    client_secret_env: Option<String>,
    #[serde(default)]
    client_auth: ClientAuthKind,
    #[serde(default, deserialize_with = "refresh_ahead")]
    refresh_ahead: Option<Duration>,
    #[serde(default, deserialize_with = "winner_wait")]
    winner_wait: Option<Duration>,
    #[serde(default, deserialize_with = "timeout")]
    timeout: Option<Duration>,
    keep_fresh: Option<bool>,
    #[serde(default)]
    store: RawStore,
    etcd_endpoints: Option<Vec<String>>,
    etcd_prefix: Option<String>,
    etcd_user: Option<String>,
    etcd_password_env: Option<String>,
    etcd_password_file: Option<String>,
    etcd_ca_file: Option<String>,
    etcd_cert_file: Option<String>,
    etcd_key_file: Option<String>,
    etcd_tls_domain: Option<String>,
    encryption_key_file: Option<String>,
    spool_dir: Option<String>,
    takeover: Option<RawTakeover>,
    #[serde(default, deserialize_with = "lease_ttl")]
    lease_ttl: Option<Duration>,
}

#[derive(Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawStore {
    #[default]
    File,
    Etcd,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum RawTakeover {
    Wait,
    RetryOnce,
}

fn lease_ttl<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let ttl = duration_field(d, true, TEN_MINUTES)?;
    if ttl.is_some_and(|t| t < Duration::from_secs(5)) {
        return Err(serde::de::Error::custom("must be at least 5s"));
    }
    Ok(ttl)
}

impl RawProfile {
    fn into_profile(self, resolve: &dyn Fn(&str) -> Result<PathBuf, String>) -> Result<Profile, String> {
        let provider = match self.provider {
            RawDialect::Codex => Dialect::Codex,
            RawDialect::Oauth2 => Dialect::OAuth2,
        };
        let auth_file = match &self.auth_file {
            Some(p) => Some(resolve(p).map_err(|m| format!("auth_file {m}"))?),
            None => None,
        };
        if provider == Dialect::OAuth2 {
            for (key, set) in [
                ("auth_file", auth_file.is_some() || self.store == RawStore::Etcd),
                ("token_url", self.token_url.is_some()),
                ("client_id", self.client_id.is_some()),
            ] {
                if !set {
                    return Err(format!("needs {key} with provider = \"oauth2\""));
                }
            }
        }
        if let Some(url) = &self.token_url {
            // Its messages quote the URL: the value is left out here.
            crate::provider::check_token_url(url)
                .map_err(|why| format!("token_url: {}", without_quoted_values(&why)))?;
            if reqwest::Url::parse(url).is_ok_and(|u| !u.username().is_empty() || u.password().is_some()) {
                return Err("token_url must not carry a user or password (user:secret@host); \
                            a client secret goes in the variable named by client_secret_env"
                    .into());
            }
        }
        if let Some(var) = &self.client_secret_env {
            let name = var
                .bytes()
                .enumerate()
                .all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()));
            if var.is_empty() || !name {
                return Err(
                    "client_secret_env must name an environment variable (letters, digits and '_'), \
                     not hold the secret"
                        .into(),
                );
            }
        }
        match (self.client_auth, &self.client_secret_env) {
            (ClientAuthKind::Basic | ClientAuthKind::Post, None) => {
                return Err("client_auth basic or post needs client_secret_env (the secret's variable)".into())
            }
            (_, _) if provider == Dialect::Codex && self.client_auth != ClientAuthKind::None => {
                return Err("client_auth applies to provider = \"oauth2\" only".into())
            }
            _ => {}
        }
        let store = self.store_settings(&auth_file, resolve)?;
        Ok(Profile {
            store,
            provider,
            auth_file,
            token_url: self.token_url,
            client_id: self.client_id,
            client_secret_env: self.client_secret_env,
            client_auth: self.client_auth,
            refresh_ahead: self.refresh_ahead.unwrap_or(DEFAULT_REFRESH_AHEAD),
            winner_wait: self.winner_wait.unwrap_or(DEFAULT_WINNER_WAIT),
            timeout: self.timeout.unwrap_or(DEFAULT_HTTP_TIMEOUT),
            keep_fresh: self.keep_fresh.unwrap_or(true),
        })
    }
}

impl RawProfile {
    /// The `store` and its settings; etcd keys without `store = "etcd"`
    /// are an error rather than silently ignored.
    fn store_settings(
        &self,
        auth_file: &Option<PathBuf>,
        resolve: &dyn Fn(&str) -> Result<PathBuf, String>,
    ) -> Result<ProfileStore, String> {
        let etcd_keys = [
            ("etcd_endpoints", self.etcd_endpoints.is_some()),
            ("etcd_prefix", self.etcd_prefix.is_some()),
            ("etcd_user", self.etcd_user.is_some()),
            ("etcd_password_env", self.etcd_password_env.is_some()),
            ("etcd_password_file", self.etcd_password_file.is_some()),
            ("etcd_ca_file", self.etcd_ca_file.is_some()),
            ("etcd_cert_file", self.etcd_cert_file.is_some()),
            ("etcd_key_file", self.etcd_key_file.is_some()),
            ("etcd_tls_domain", self.etcd_tls_domain.is_some()),
            ("encryption_key_file", self.encryption_key_file.is_some()),
            ("spool_dir", self.spool_dir.is_some()),
            ("takeover", self.takeover.is_some()),
            ("lease_ttl", self.lease_ttl.is_some()),
        ];
        if self.store == RawStore::File {
            return match etcd_keys.iter().find(|(_, set)| *set) {
                Some((key, _)) => Err(format!("{key} applies to store = \"etcd\" only")),
                None => Ok(ProfileStore::File),
            };
        }
        if auth_file.is_some() {
            return Err(
                "auth_file and store = \"etcd\" exclude each other: the credential lives in etcd \
                        (seed it with `token-broker fleet import --profile NAME --from FILE`)"
                    .into(),
            );
        }
        let (Some(endpoints), Some(prefix)) = (&self.etcd_endpoints, &self.etcd_prefix) else {
            return Err("store = \"etcd\" needs etcd_endpoints and etcd_prefix".into());
        };
        crate::store::check_etcd_location(endpoints, prefix)?;
        if let Some(var) = &self.etcd_password_env {
            if !looks_like_a_variable(var) {
                return Err(
                    "etcd_password_env must name an environment variable (A-Z, 0-9, _), not hold the password".into(),
                );
            }
        }
        if self.etcd_password_env.is_some() && self.etcd_password_file.is_some() {
            return Err("etcd_password_env and etcd_password_file exclude each other".into());
        }
        if self.etcd_user.is_none() && (self.etcd_password_env.is_some() || self.etcd_password_file.is_some()) {
            return Err("an etcd password needs etcd_user".into());
        }
        if self.etcd_user.is_some() && self.etcd_password_env.is_none() && self.etcd_password_file.is_none() {
            return Err("etcd_user needs etcd_password_env or etcd_password_file".into());
        }
        if self.etcd_cert_file.is_some() != self.etcd_key_file.is_some() {
            return Err("etcd_cert_file and etcd_key_file go together".into());
        }
        if (self.etcd_cert_file.is_some() || self.etcd_tls_domain.is_some()) && self.etcd_ca_file.is_none() {
            return Err("etcd_cert_file, etcd_key_file and etcd_tls_domain need etcd_ca_file".into());
        }
        // A refresh token is spent only while the lease certainly outlives
        // the request (its timeout and a grace); keep-alives renew it every
        // third of its TTL, so two thirds of it must cover that.
        let timeout = self.timeout.unwrap_or(DEFAULT_HTTP_TIMEOUT);
        let needed = (timeout + crate::defaults::TIMEOUT_GRACE) * 3 / 2;
        let lease_ttl = match self.lease_ttl {
            Some(ttl) if ttl <= needed => {
                return Err(format!(
                    "lease_ttl must be more than one and a half times timeout plus 1s (more than {}), \
                     else the lease could lapse while a token request is under way and nothing would be spent",
                    humantime::format_duration(needed)
                ))
            }
            Some(ttl) => ttl,
            None => Duration::from_secs(30).max((timeout + crate::defaults::TIMEOUT_GRACE) * 2),
        };
        let path = |key: &str, value: &Option<String>| -> Result<Option<PathBuf>, String> {
            value
                .as_deref()
                .map(|p| resolve(p).map_err(|m| format!("{key} {m}")))
                .transpose()
        };
        Ok(ProfileStore::Etcd(Box::new(EtcdProfile {
            endpoints: endpoints.clone(),
            prefix: prefix.trim_end_matches('/').to_owned(),
            user: self.etcd_user.clone(),
            password_env: self.etcd_password_env.clone(),
            password_file: path("etcd_password_file", &self.etcd_password_file)?,
            ca_file: path("etcd_ca_file", &self.etcd_ca_file)?,
            cert_file: path("etcd_cert_file", &self.etcd_cert_file)?,
            key_file: path("etcd_key_file", &self.etcd_key_file)?,
            tls_domain: self.etcd_tls_domain.clone(),
            encryption_key_file: path("encryption_key_file", &self.encryption_key_file)?,
            spool_dir: path("spool_dir", &self.spool_dir)?,
            takeover: match self.takeover {
                Some(RawTakeover::RetryOnce) => crate::store::Takeover::RetryOnce,
                Some(RawTakeover::Wait) | None => crate::store::Takeover::Wait,
            },
            lease_ttl,
        })))
    }
}

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
const TEN_MINUTES: Duration = Duration::from_secs(600);
const HOUR: Duration = Duration::from_secs(3600);

/// A duration written as text (`90s`, `10m`, `2h`), at most `max` and, when
/// `positive`, more than zero; else a message stating the bounds. (The
/// command line's duration flags use it too.)
pub fn parse_duration(text: &str, positive: bool, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|_| "is not a duration (e.g. 90s, 10m, 2h)".to_owned())?;
    let shown = shown_bound(max);
    if positive && d.is_zero() {
        return Err(format!("must be more than zero and at most {shown}"));
    }
    if d > max {
        return Err(if positive {
            format!("must be more than zero and at most {shown}")
        } else {
            format!("must be at most {shown}")
        });
    }
    Ok(d)
}

/// A bound as a person writes it: `365d`, `1h`, `10m`, `90s`.
fn shown_bound(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn duration_field<'de, D: serde::Deserializer<'de>>(
    d: D,
    positive: bool,
    max: Duration,
) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text, positive, max)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn refresh_ahead<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration_field(d, false, YEAR)
}

fn winner_wait<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration_field(d, false, TEN_MINUTES)
}

fn timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration_field(d, true, HOUR)
}

fn connect_timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration_field(d, true, TEN_MINUTES)
}

fn response_timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration_field(d, true, HOUR)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"
[daemon]
# default: $XDG_RUNTIME_DIR/token-broker.sock, else ~/.local/state/token-broker/token-broker.sock
socket = "/run/user/1000/token-broker.sock"

[profiles.codex]
provider = "codex"                 # auth_file defaults as for the codex builder
refresh_ahead = "10m"

[profiles.corp]
provider = "oauth2"
auth_file = "~/.config/corp/oauth.json"
token_url = "https://login.example.com/oauth2/token"
client_id = "my-client"
client_secret_env = "CORP_CLIENT_SECRET"
client_auth = "basic"              # none | basic | post
timeout = "30s"
"#;

    #[test]
    fn the_documented_example_parses_as_written() {
        let c = Config::parse(ISSUE_EXAMPLE, None).unwrap();
        assert_eq!(c.daemon.socket, Path::new("/run/user/1000/token-broker.sock"));
        let codex = &c.profiles["codex"];
        assert_eq!(codex.provider, Dialect::Codex);
        assert_eq!(codex.auth_file, None);
        assert_eq!(codex.refresh_ahead, Duration::from_secs(600));
        let corp = &c.profiles["corp"];
        assert_eq!(corp.provider, Dialect::OAuth2);
        assert_eq!(corp.client_auth, ClientAuthKind::Basic);
        assert_eq!(corp.timeout, Duration::from_secs(30));
        if let Some(home) = env_path("HOME") {
            assert_eq!(corp.auth_file, Some(home.join(".config/corp/oauth.json")));
        }
    }

    #[test]
    fn no_profiles_means_one_codex_default() {
        for text in ["", "[daemon]\nallowed_uids = [1001]\n", "[profiles]\n"] {
            let c = Config::parse(text, None).unwrap();
            assert_eq!(c.profiles.len(), 1, "{text}");
            assert_eq!(c.profiles[DEFAULT_PROFILE], Profile::codex_defaults());
        }
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let text = "[profiles.a]\nprovider = \"codex\"\nrefresh_ahaed = \"10m\"\n";
        let e = Config::parse(text, Some(Path::new("/etc/tb.toml"))).unwrap_err();
        let shown = e.to_string();
        assert!(matches!(e, ConfigError::Parse { line: 3, .. }), "{shown}");
        assert!(shown.starts_with("/etc/tb.toml: line 3"), "{shown}");
        assert!(shown.contains("refresh_ahaed"), "{shown}");
        let e = Config::parse("[deamon]\n", None).unwrap_err();
        assert!(e.to_string().contains("deamon"), "{e}");
    }

    #[test]
    fn errors_never_quote_values() {
        for text in [
            "[profiles.a]\nprovider = \"codex\"\nclient_secret = \"sk-SECRET-VALUE\"\n",
            "[profiles.a]\nprovider = \"sk-SECRET-VALUE\"\n",
            "[profiles.a]\nprovider = \"codex\"\ntimeout = \"sk-SECRET-VALUE\"\n",
            "[daemon]\nallowed_uids = [\"sk-SECRET-VALUE\"]\n",
            "[profiles.a]\nprovider = \"codex\"\ntoken_url = \"ftp://sk-SECRET-VALUE/x\"\n",
            "sk-proj-SECRET-VALUE-0123456789abcdefghij = \"sk-SECRET-VALUE\"",
            "[profiles.a]\nprovider = \"codex\"\nkeep_fresh = \"sk-SECRET-VALUE\"\n",
        ] {
            let e = Config::parse(text, None).unwrap_err();
            assert!(!format!("{e} {e:?}").contains("SECRET"), "{text}: {e}");
        }
    }

    #[test]
    fn oauth2_profiles_need_their_settings() {
        let e = Config::parse("[profiles.a]\nprovider = \"oauth2\"\n", None).unwrap_err();
        assert!(e.to_string().contains("needs auth_file"), "{e}");
        let e = Config::parse(
            "[profiles.a]\nprovider = \"oauth2\"\nauth_file = \"/x\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_auth = \"post\"\n",
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("client_secret_env"), "{e}");
    }

    #[test]
    fn durations_are_bounded() {
        let e = Config::parse("[profiles.a]\nprovider = \"codex\"\ntimeout = \"0s\"\n", None).unwrap_err();
        assert!(e.to_string().contains("more than zero"), "{e}");
        let e = Config::parse("[profiles.a]\nprovider = \"codex\"\nwinner_wait = \"1h\"\n", None).unwrap_err();
        assert!(e.to_string().contains("at most 10m"), "{e}");
    }

    #[test]
    fn profile_names_are_path_and_label_safe() {
        for bad in ["", ".hidden", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(check_profile_name(bad).is_err(), "{bad:?}");
        }
        let e = Config::parse("[profiles.\"a/b\"]\nprovider = \"codex\"\n", None).unwrap_err();
        assert!(e.to_string().contains("profile name"), "{e}");
        for good in ["default", "corp-eu.1", "A_b"] {
            check_profile_name(good).unwrap();
        }
    }

    #[test]
    fn relative_paths_are_against_the_config_folder() {
        let c = Config::parse(
            "[daemon]\nsocket = \"run/tb.sock\"\n[profiles.a]\nprovider = \"codex\"\nauth_file = \"a/auth.json\"\n",
            Some(Path::new("/etc/tb/config.toml")),
        )
        .unwrap();
        assert_eq!(c.daemon.socket, Path::new("/etc/tb/run/tb.sock"));
        assert_eq!(
            c.profiles["a"].auth_file.as_deref(),
            Some(Path::new("/etc/tb/a/auth.json"))
        );
    }

    #[test]
    fn max_upstream_headers_defaults_to_hypers_cap_and_is_bounded() {
        let proxy = |extra: &str| {
            Config::parse(
                &format!(
                    "[profiles.a]\nprovider = \"codex\"\n[proxies.p]\nprofile = \"a\"\n\
                     listen = \"127.0.0.1:8788\"\nupstream = \"https://example.com/v1\"\n{extra}"
                ),
                None,
            )
        };
        let c = proxy("").unwrap();
        assert_eq!(c.proxies["p"].max_upstream_headers, DEFAULT_MAX_UPSTREAM_HEADERS);
        assert_eq!(
            proxy("max_upstream_headers = 256\n").unwrap().proxies["p"].max_upstream_headers,
            256
        );
        for bad in ["0", "10001", "18446744073709551615"] {
            let e = proxy(&format!("max_upstream_headers = {bad}\n")).unwrap_err();
            assert!(e.to_string().contains("max_upstream_headers"), "{bad}: {e}");
        }
    }
}
