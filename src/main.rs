//! `token-broker`: a thin command line over the library.
//!
//! Exit codes: 0 ok; 2 usage error; 3 credentials file missing, unreadable
//! or invalid; 4 login required; 5 provider unavailable or another process
//! refreshing (try again later); 1 anything else; 128+N stopped by signal N
//! (after any refresh in flight was written).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

mod cli;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use token_broker::provider::ClientAuth;
use token_broker::server::client::{ClientError, DaemonClient};
use token_broker::server::config::{Config, ConfigError, Profile, DEFAULT_PROFILE};
use token_broker::server::daemon::{Daemon, DaemonError};
use token_broker::server::TokenReply;
use token_broker::{BrokerError, Dialect, TokenBroker};

/// Hands out OAuth access tokens without ever racing on a refresh token.
#[derive(Debug, Parser)]
#[command(name = "token-broker", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    creds: CredentialArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a valid access token and a newline, refreshing only if needed.
    Token {
        /// How to print it: the token alone, the daemon's token JSON, an
        /// `Authorization` header, or a Kubernetes ExecCredential (for
        /// kubectl's exec credential plugins).
        #[arg(long, value_enum, default_value_t = Format::Plain)]
        format: Format,
    },
    /// Show the credential's state without secrets.
    Status,
    /// Run the demonstration: a simulated provider on loopback and a
    /// scheduler of cron jobs and request actors sharing one credential.
    Simulate(SimulateArgs),
    /// Serve every profile of the configuration to the processes of this
    /// host over a Unix socket, and run its proxies, until SIGTERM or
    /// SIGINT (SIGHUP reloads the configuration).
    Serve,
    /// Run one auth-injecting proxy: every request to --listen goes to
    /// --upstream with the credential's token, refreshed once on a 401.
    Proxy(ProxyArgs),
    /// Share one credential across hosts through etcd: seed it, or look at
    /// it (profiles with store = "etcd"; needs a build with `--features
    /// etcd`).
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Keep a broker running and print a line (a fingerprint, never the
    /// token) whenever the access token changes.
    Watch {
        /// How often to ask for a token (at most 1 day).
        #[arg(long, value_name = "DURATION", value_parser = watch_interval, default_value = "1s")]
        interval: Duration,
        /// Stop after this long, at most a year (default: run until interrupted).
        #[arg(long, value_name = "DURATION", value_parser = watch_duration)]
        duration: Option<Duration>,
    },
}

#[derive(Debug, Subcommand)]
enum FleetCommand {
    /// Seed etcd with the tokens of a Codex or OAuth2 credentials file (the
    /// profile's provider says which). Refuses to replace other tokens that
    /// expire no earlier than the file's, unless --force.
    Import {
        /// The credentials file to read.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// Replace the tokens in etcd even when they are newer.
        #[arg(long)]
        force: bool,
    },
    /// Show the lock holder, the generation, the expiry and any refresh in
    /// progress, without secrets.
    Status,
    /// Seal tokens stored unsealed with the profile's encryption_key_file
    /// (once, after adding a key to a credential already in etcd: with a
    /// key, unsealed tokens are not trusted).
    Seal,
}

#[derive(Debug, Args)]
struct ProxyArgs {
    /// Where to listen (loopback unless --allow-remote).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8788")]
    listen: std::net::SocketAddr,
    /// The upstream base URL (https://, or http:// to loopback); a
    /// request's path is appended to its path.
    #[arg(long, value_name = "URL")]
    upstream: String,
    /// Listen on a non-loopback address.
    #[arg(long)]
    allow_remote: bool,
    /// Do not require the client key (for a single-user machine).
    #[arg(long)]
    no_client_key: bool,
    /// Keep request bodies up to this many bytes to send them again after
    /// a 401.
    #[arg(long, value_name = "BYTES", default_value_t = token_broker::server::config::DEFAULT_RETRY_BODY_LIMIT)]
    retry_body_limit: usize,
    /// The most header fields an upstream's HTTP/1.1 answer may have (an
    /// answer with more is a 502; HTTP/2 answers are not counted); above
    /// the default, every answer costs more.
    #[arg(long, value_name = "N", default_value_t = token_broker::server::config::DEFAULT_MAX_UPSTREAM_HEADERS)]
    max_upstream_headers: usize,
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// Use the design the broker replaces: every job refreshes on its own.
    #[arg(long, conflicts_with = "compare")]
    naive: bool,
    /// Run the same load twice, one after the other: first with the naive
    /// design, then with the broker; print both summaries.
    #[arg(long)]
    compare: bool,
    /// Draw the run (with --compare, both runs on one time axis) as an SVG
    /// in this file: token requests and failed calls per 100 ms, token
    /// expiries, and the callers' wait for a token per second.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Cron-job actors (each fires every 100 to 500 ms; at most 10000).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(0..=MAX_JOBS))]
    jobs: u32,
    /// Concurrent request actors (at most 100000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=MAX_CONCURRENCY))]
    concurrency: u32,
    /// The provider's access-token lifetime (more than zero, at most 1 day).
    #[arg(long, value_name = "DURATION", value_parser = token_lifetime, default_value = "2s")]
    token_lifetime: Duration,
    /// How long the load runs (at most 1 day).
    #[arg(long, value_name = "DURATION", value_parser = simulate_duration, default_value = "10s")]
    duration: Duration,
    /// The provider's latency per token request (at most 1 minute).
    #[arg(long, value_name = "DURATION", value_parser = latency, default_value = "50ms")]
    latency: Duration,
    /// The fraction of token requests the provider fails with 503 (0 to 1).
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    fault_rate: f64,
    /// Seeds which token requests fail, so that a run with faults can be
    /// repeated: the n-th token request fails or not alike in every run.
    #[arg(long, value_name = "SEED", requires = "fault_rate")]
    fault_seed: Option<u64>,
    /// The provider revokes the whole token family when a refresh token is reused.
    #[arg(long)]
    revoke_on_reuse: bool,
}

const MAX_JOBS: i64 = 10_000;
const MAX_CONCURRENCY: i64 = 100_000;

/// The bounds of the duration flags.
const MINUTE: Duration = Duration::from_secs(60);
const TEN_MINUTES: Duration = Duration::from_secs(600);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration flag's value, at most `max` and, when `positive`, more than
/// zero; else a usage error that states the bounds (clap names the flag and
/// exits 2). Bounding every duration keeps absurd values (`300000000000y`)
/// from overflowing instants anywhere downstream.
fn bounded_duration(text: &str, positive: bool, max: Duration) -> Result<Duration, String> {
    token_broker::server::config::parse_duration(text, positive, max)
}

fn refresh_ahead(text: &str) -> Result<Duration, String> {
    bounded_duration(text, false, YEAR)
}

fn winner_wait(text: &str) -> Result<Duration, String> {
    bounded_duration(text, false, TEN_MINUTES)
}

fn http_timeout(text: &str) -> Result<Duration, String> {
    bounded_duration(text, true, HOUR)
}

fn watch_interval(text: &str) -> Result<Duration, String> {
    bounded_duration(text, false, DAY)
}

fn watch_duration(text: &str) -> Result<Duration, String> {
    bounded_duration(text, false, YEAR)
}

fn token_lifetime(text: &str) -> Result<Duration, String> {
    bounded_duration(text, true, DAY)
}

fn simulate_duration(text: &str) -> Result<Duration, String> {
    bounded_duration(text, false, DAY)
}

fn latency(text: &str) -> Result<Duration, String> {
    bounded_duration(text, false, MINUTE)
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{text:?} is not a number from 0 to 1")),
    }
}

/// `token --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// The token and a newline.
    Plain,
    /// `{"access_token","token_type","expires_at","account_id"}`.
    Json,
    /// `Authorization: Bearer <token>`.
    Header,
    /// A `client.authentication.k8s.io/v1` ExecCredential.
    ExecCredential,
}

/// `--daemon`: whether a profile is asked of a running daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DaemonMode {
    /// Ask the daemon; read the credentials directly when none answers.
    Auto,
    /// Ask the daemon; fail (exit 5) when none answers.
    Require,
    /// Never ask a daemon.
    Never,
}

#[derive(Debug, Args)]
struct CredentialArgs {
    /// The configuration file [default: $TOKEN_BROKER_CONFIG, else
    /// $XDG_CONFIG_HOME/token-broker/config.toml, else ~/.config/token-broker/config.toml].
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Use this profile of the configuration (asked of the daemon first,
    /// see --daemon) instead of the credential flags.
    #[arg(long, global = true, value_name = "NAME")]
    profile: Option<String>,
    /// With --profile: ask a running daemon (auto: when one answers,
    /// require: or fail with exit 5, never: read the credentials here).
    #[arg(long, global = true, value_enum, default_value_t = DaemonMode::Auto, env = "TOKEN_BROKER_DAEMON")]
    daemon: DaemonMode,
    /// The credentials file [default for codex: $CODEX_HOME/auth.json, else ~/.codex/auth.json].
    #[arg(long, global = true, value_name = "PATH")]
    auth_file: Option<PathBuf>,
    /// The provider's dialect: its credentials file and refresh requests.
    #[arg(long, global = true, value_enum, default_value_t = DialectArg::Codex)]
    provider: DialectArg,
    /// The token endpoint (required for oauth2; overrides the codex default).
    #[arg(long, global = true, value_name = "URL")]
    token_url: Option<String>,
    /// The OAuth client id (required for oauth2).
    #[arg(long, global = true, value_name = "ID")]
    client_id: Option<String>,
    /// The name of the environment variable holding the client secret (never pass a secret as an argument).
    #[arg(long, global = true, value_name = "VAR")]
    client_secret_env: Option<String>,
    /// How an oauth2 client authenticates.
    #[arg(long, global = true, value_enum, default_value_t = ClientAuthKind::None)]
    client_auth: ClientAuthKind,
    /// Refresh this long before expiry (e.g. 90s, 10m; at most a year).
    #[arg(long, global = true, value_name = "DURATION", value_parser = refresh_ahead, default_value = "10m")]
    refresh_ahead: Duration,
    /// After the provider refuses the refresh token (spent by another
    /// program a moment earlier), watch the file this long for the winner's
    /// tokens before reporting that a sign-in is needed (at most 10 minutes).
    #[arg(long, global = true, value_name = "DURATION", value_parser = winner_wait, default_value = "8s", env = "TOKEN_BROKER_WINNER_WAIT")]
    winner_wait: Duration,
    /// The timeout of one token request (e.g. 30s; more than zero, at most 1 hour).
    #[arg(long, global = true, value_name = "DURATION", value_parser = http_timeout, default_value = "30s")]
    timeout: Duration,
    /// Print the status, and any error, as JSON.
    #[arg(long, global = true)]
    json: bool,
}

/// `--provider`: the library's [`Dialect`], as the command line spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DialectArg {
    /// The Codex CLI's auth.json and OpenAI's JSON refresh dialect.
    Codex,
    /// A generic OAuth2 credentials file and RFC 6749 form refreshes.
    Oauth2,
}

impl From<DialectArg> for Dialect {
    fn from(arg: DialectArg) -> Self {
        match arg {
            DialectArg::Codex => Dialect::Codex,
            DialectArg::Oauth2 => Dialect::OAuth2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ClientAuthKind {
    /// A public client: client_id in the form.
    None,
    /// client_secret_basic.
    Basic,
    /// client_secret_post.
    Post,
}

/// A failure of the command: the broker's, or writing the output.
enum CliError {
    Broker(BrokerError),
    Output(std::io::Error),
    Simulation(std::io::Error),
    /// `simulate --plot` could not write its SVG to this file.
    Plot(PathBuf, String),
    /// Stopped by this signal (after any refresh in flight was written).
    Interrupted(i32),
    /// A refresh in flight did not end within this bound.
    Unfinished(Duration),
    /// A broker error already printed (by `watch`): exit with its code and
    /// print nothing more.
    Reported(BrokerError),
    /// The configuration file could not be used.
    Config(ConfigError),
    /// `--daemon require` and no daemon answers.
    NoDaemon {
        socket: PathBuf,
        why: String,
    },
    /// The daemon answered with an error, or badly.
    Daemon(ClientError),
    /// `serve` could not start, or stopped badly.
    Serve(DaemonError),
    /// `proxy` could not start.
    Proxy(token_broker::server::proxy::ProxyError),
}

impl From<BrokerError> for CliError {
    fn from(e: BrokerError) -> Self {
        CliError::Broker(e)
    }
}

fn main() -> ExitCode {
    keep_secrets_out_of_dumps();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let serving = matches!(cli.command, Command::Serve);
    init_logging(if serving { "info" } else { "off" });
    let json = cli.creds.json;
    let explicit = explicit_credential_flags(&matches);
    if serving {
        return match serve(&cli.creds, &explicit) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(json, &e),
        };
    }
    if let Command::Simulate(args) = &cli.command {
        // The job actors run on an actix System of their own.
        return match actix_rt::System::new().block_on(simulate(args, json)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(json, &e),
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(json, &CliError::Simulation(e)),
    };
    if let Command::Fleet(command) = &cli.command {
        return match runtime.block_on(fleet(&cli.creds, &explicit, command)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(json, &e),
        };
    }
    match runtime.block_on(run(cli, explicit)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(json, &e),
    }
}

/// The credential flags given on the command line (or, for
/// `--winner-wait`, in its variable): a profile takes these settings from
/// the configuration instead.
fn explicit_credential_flags(matches: &clap::ArgMatches) -> Vec<&'static str> {
    use clap::parser::ValueSource;
    const FLAGS: [(&str, &str); 9] = [
        ("auth_file", "--auth-file"),
        ("provider", "--provider"),
        ("token_url", "--token-url"),
        ("client_id", "--client-id"),
        ("client_secret_env", "--client-secret-env"),
        ("client_auth", "--client-auth"),
        ("refresh_ahead", "--refresh-ahead"),
        ("winner_wait", "--winner-wait"),
        ("timeout", "--timeout"),
    ];
    // Global flags may be given after the subcommand: look there too.
    let sub = matches.subcommand().map(|(_, m)| m);
    FLAGS
        .iter()
        .filter(|(id, _)| {
            [Some(matches), sub].into_iter().flatten().any(|m| {
                matches!(
                    m.try_get_raw(id).ok().flatten().and(m.value_source(id)),
                    Some(ValueSource::CommandLine)
                )
            })
        })
        .map(|(_, flag)| *flag)
        .collect()
}

/// The process holds live tokens and client secrets in memory: no core dump
/// may write them to disk (`kill -ABRT`, a crash), and no other process of
/// the same user may read its memory (`ptrace`, `/proc/<pid>/mem`). Runs
/// first thing, before any secret is read. Best effort: a failure leaves
/// the process as it was.
fn keep_secrets_out_of_dumps() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_DUMPABLE takes plain integer arguments and only changes
    // this process's dumpable flag.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let _ = rlimit::setrlimit(rlimit::Resource::CORE, 0, 0);
}

/// Logs go to stderr, `default` (quiet but for `serve`) unless `RUST_LOG`
/// asks for more.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: a daemon's stderr is a pipe to a journal
    // or a file, where escape codes garble every `key=value` field.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(cli: Cli, explicit: Vec<&'static str>) -> Result<(), CliError> {
    // Before anything can spend a refresh token: a signal must never cut a
    // refresh between spending the old token and writing the new ones.
    let mut signals = Signals::install().map_err(CliError::Output)?;
    // Only a long-running broker keeps the file fresh unasked: a one-shot
    // `status` must never spend a refresh token.
    let keep_fresh = matches!(cli.command, Command::Watch { .. } | Command::Proxy(_));
    let json = cli.creds.json;
    // A profile: named, or `default` when the daemon is required.
    let profile = match (&cli.creds.profile, cli.creds.daemon) {
        (Some(name), _) => Some(name.clone()),
        (None, DaemonMode::Require) => Some(DEFAULT_PROFILE.to_owned()),
        (None, _) => None,
    };
    let (broker, timeout, winner_wait) = match &profile {
        None => (build(&cli.creds, keep_fresh)?, cli.creds.timeout, cli.creds.winner_wait),
        Some(name) => {
            if let Some(flag) = explicit.first() {
                return Err(CliError::Broker(BrokerError::Config(format!(
                    "{flag} cannot be used with a profile: the profile's settings come from the configuration"
                ))));
            }
            let config = Config::load(cli.creds.config.as_deref()).map_err(CliError::Config)?;
            let settings = config.profiles.get(name).cloned();
            // A profile this configuration file defines is asked for as the
            // credential it names here: the daemon serves it only when its
            // profile of that name is the same credential.
            let expected = config
                .source
                .as_ref()
                .and(settings.as_ref())
                .map(Profile::credential_id);
            if cli.creds.daemon != DaemonMode::Never && !keep_fresh {
                let mut client = daemon_client(&config, settings.as_ref());
                if let Some(id) = &expected {
                    client = client.credential(id.clone());
                }
                let asked = tokio::select! {
                    asked = ask_daemon(&client, name, &cli.command, json) => asked,
                    signal = signals.recv() => return Err(CliError::Interrupted(signal)),
                };
                match asked {
                    Err(ClientError::Unreachable { .. }) if cli.creds.daemon == DaemonMode::Auto => {
                        tracing::debug!(socket = %client.socket().display(), "no daemon answers: reading the credentials here");
                    }
                    // The daemon serves another credential under this name,
                    // or none yet: read the one this configuration names here.
                    Err(ClientError::Daemon { code, .. })
                        if cli.creds.daemon == DaemonMode::Auto
                            && expected.is_some()
                            && matches!(code.as_str(), "profile_mismatch" | "unknown_profile") =>
                    {
                        tracing::debug!(%code, "the daemon does not serve this configuration's profile: reading the credentials here");
                    }
                    Err(ClientError::Unreachable { socket, why }) => {
                        return Err(CliError::NoDaemon { socket, why });
                    }
                    other => return other.map_err(CliError::Daemon).and_then(|output| write_out(&output)),
                }
            } else if cli.creds.daemon == DaemonMode::Require {
                return Err(CliError::Broker(BrokerError::Config(
                    "watch and proxy run their own broker: use --daemon auto or never with them".into(),
                )));
            }
            let settings = config.profile(name).map_err(CliError::Config)?;
            let broker = settings.builder()?.keep_fresh(keep_fresh).build()?;
            (broker, settings.timeout, settings.winner_wait)
        }
    };
    let result: Result<(), CliError> = match cli.command {
        Command::Token { format } => tokio::select! {
            result = print_token(&broker, format) => result,
            signal = signals.recv() => Err(CliError::Interrupted(signal)),
        },
        Command::Status => tokio::select! {
            result = print_status(&broker, json) => result,
            signal = signals.recv() => Err(CliError::Interrupted(signal)),
        },
        Command::Watch { interval, duration } => watch(&broker, interval, duration, json, &mut signals).await,
        Command::Proxy(args) => run_proxy(&broker, &args, &mut signals).await,
        Command::Simulate(_) | Command::Serve | Command::Fleet(_) => unreachable!("handled in main"),
    };
    // Let a refresh in flight write its tokens before the process exits,
    // whatever signals arrive meanwhile (they stay caught). A cycle that has
    // not spent yet stops at once; one that has can still need two requests
    // (an unknown outcome is retried once, each with a second of grace), the
    // wait for a winner, and its writes (four attempts, each waiting up to
    // 10 s for the Codex CLI's commit locks).
    let bound = token_broker::defaults::finish_bound(timeout, winner_wait);
    match tokio::time::timeout(bound, broker.finish()).await {
        Ok(Ok(())) => result,
        // Rotated tokens that could not be written outrank everything, even
        // a token already printed: the credential may be lost.
        Ok(Err(lost)) => Err(lost.into()),
        Err(_) => Err(CliError::Unfinished(bound)),
    }
}

/// A client of the configured daemon, waiting as long as the daemon may
/// take to refresh the profile (its settings, when this configuration
/// knows them).
fn daemon_client(config: &Config, profile: Option<&Profile>) -> DaemonClient {
    let settings = profile.cloned().unwrap_or_else(Profile::codex_defaults);
    let wait = token_broker::defaults::refresh_bound(settings.timeout, settings.winner_wait)
        .saturating_add(Duration::from_secs(15));
    DaemonClient::new(&config.daemon.socket).timeout(wait)
}

/// Asks the daemon for what `command` prints; returns the output.
async fn ask_daemon(
    client: &DaemonClient,
    profile: &str,
    command: &Command,
    json: bool,
) -> Result<String, ClientError> {
    match command {
        Command::Token { format } => Ok(format_token(&client.token(profile).await?, *format)),
        Command::Status if json => Ok(format!("{}\n", client.status_json(profile).await?)),
        Command::Status => client.status_text(profile).await,
        Command::Watch { .. } | Command::Simulate(_) | Command::Serve | Command::Proxy(_) | Command::Fleet(_) => {
            unreachable!("not asked of a daemon")
        }
    }
}

/// The etcd profile `fleet` works on: `--profile NAME` of the
/// configuration, with `store = "etcd"`.
fn fleet_profile(creds: &CredentialArgs, explicit: &[&'static str]) -> Result<Profile, CliError> {
    if let Some(flag) = explicit.first() {
        return Err(CliError::Broker(BrokerError::Config(format!(
            "fleet takes its settings from the profile, not {flag}"
        ))));
    }
    let Some(name) = &creds.profile else {
        return Err(CliError::Broker(BrokerError::Config(
            "fleet needs --profile NAME: a profile with store = \"etcd\"".into(),
        )));
    };
    let config = Config::load(creds.config.as_deref()).map_err(CliError::Config)?;
    let profile = config.profile(name).map_err(CliError::Config)?;
    if profile.store == token_broker::server::config::ProfileStore::File {
        return Err(CliError::Broker(BrokerError::Config(format!(
            "the profile {name} keeps its credential in a file; fleet works on profiles with store = \"etcd\""
        ))));
    }
    Ok(profile.clone())
}

/// `fleet import` and `fleet status`.
#[cfg(feature = "etcd")]
async fn fleet(creds: &CredentialArgs, explicit: &[&'static str], command: &FleetCommand) -> Result<(), CliError> {
    use token_broker::server::config::ProfileStore;
    use token_broker::store::{CodexAuthFile, EtcdStore, ImportError, Imported, OAuth2File};
    let profile = fleet_profile(creds, explicit)?;
    let ProfileStore::Etcd(etcd) = &profile.store else {
        unreachable!("fleet_profile returns etcd profiles only");
    };
    let store = EtcdStore::new(profile.etcd_settings(etcd)?);
    let prefix = etcd.prefix.clone();
    match command {
        FleetCommand::Import { from, force } => {
            let loaded = match profile.provider {
                Dialect::Codex => CodexAuthFile::new(from).load_blocking(),
                Dialect::OAuth2 => OAuth2File::new(from).load_blocking(),
            }
            .map_err(|e| CliError::Broker(e.into()))?;
            let done = store.import(&loaded.tokens, *force).await.map_err(|e| match e {
                ImportError::Store(e) => CliError::Broker(e.into()),
                refused @ (ImportError::Newer { .. } | ImportError::Unreadable { .. }) => {
                    CliError::Broker(BrokerError::Config(refused.to_string()))
                }
            })?;
            let what = match done {
                Imported::Created => "imported",
                Imported::Replaced => "replaced the older tokens with",
                Imported::Unchanged => "already holds",
            };
            write_out(&format!(
                "{prefix}: {what} the tokens of {} (access token {})\n",
                token_broker::store::display_path(from),
                loaded.tokens.access_token.fingerprint()
            ))
        }
        FleetCommand::Seal => {
            let sealed = store.seal().await.map_err(|e| CliError::Broker(e.into()))?;
            write_out(&format!(
                "{prefix}: {}\n",
                if sealed {
                    "sealed the stored tokens"
                } else {
                    "the stored tokens were sealed already"
                }
            ))
        }
        FleetCommand::Status => {
            let s = store.fleet_status().await.map_err(|e| CliError::Broker(e.into()))?;
            let now = SystemTime::now();
            if creds.json {
                let value = serde_json::json!({
                    "prefix": prefix,
                    "present": s.present,
                    "generation": s.generation,
                    "revision": s.revision,
                    "expires_at": s.expires_at.map(token_broker::credentials::format_rfc3339),
                    "last_refresh": s.last_refresh.map(token_broker::credentials::format_rfc3339),
                    "sealed": s.sealed,
                    "access_token_fingerprint": s.access_fingerprint,
                    "lock_holder": s.lock_holder,
                    "refreshing": s.refreshing,
                    "unreadable": s.unreadable,
                });
                return write_out(&format!("{value}\n"));
            }
            let mut out = format!("credential:     etcd {prefix}\n");
            if !s.present {
                out.push_str("tokens:         none (seed them with `token-broker fleet import`)\n");
                return write_out(&out);
            }
            out.push_str(&format!(
                "generation:     {} (revision {}{})\n",
                s.generation,
                s.revision,
                if s.sealed { ", sealed" } else { "" }
            ));
            match s.expires_at {
                _ if s.unreadable.is_some() => out.push_str(&format!(
                    "access token:   unreadable: {}\n",
                    s.unreadable.as_deref().unwrap_or_default()
                )),
                Some(at) => out.push_str(&format!(
                    "access token:   {} expires {} ({})\n",
                    s.access_fingerprint.as_deref().unwrap_or("?"),
                    token_broker::credentials::format_rfc3339(at),
                    token_broker::status::relative(at, now)
                )),
                None => out.push_str("access token:   expiry unknown\n"),
            }
            out.push_str(&format!(
                "lock:           {}\n",
                s.lock_holder.as_deref().unwrap_or("free")
            ));
            out.push_str(&format!(
                "refreshing:     {}\n",
                s.refreshing.as_deref().unwrap_or("no")
            ));
            write_out(&out)
        }
    }
}

#[cfg(not(feature = "etcd"))]
async fn fleet(creds: &CredentialArgs, explicit: &[&'static str], _command: &FleetCommand) -> Result<(), CliError> {
    fleet_profile(creds, explicit)?;
    Err(CliError::Broker(BrokerError::Config(
        "this token-broker was built without etcd support: build it with `--features etcd`".into(),
    )))
}

fn write_out(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CliError::Output)
}

/// A token as `--format` asks, with a final newline.
fn format_token(reply: &TokenReply, format: Format) -> String {
    match format {
        Format::Plain => format!("{}\n", reply.access_token.expose()),
        Format::Json => format!("{}\n", reply.to_json()),
        Format::Header => format!("Authorization: Bearer {}\n", reply.access_token.expose()),
        Format::ExecCredential => format!("{}\n", reply.to_exec_credential()),
    }
}

/// `proxy`: one proxy of the broker, until a signal.
async fn run_proxy(broker: &TokenBroker, args: &ProxyArgs, signals: &mut Signals) -> Result<(), CliError> {
    use token_broker::server::config::ProxyConfig;
    use token_broker::server::proxy::{ClientKey, Proxy};
    let mut config = ProxyConfig::new("proxy", args.listen, args.upstream.clone());
    config.allow_remote = args.allow_remote;
    config.require_client_key = !args.no_client_key;
    config.retry_body_limit = args.retry_body_limit;
    config.max_upstream_headers = args.max_upstream_headers;
    if let Err(why) = config.check() {
        return Err(CliError::Broker(BrokerError::Config(why)));
    }
    let key = if config.require_client_key {
        let path = ClientKey::default_path().ok_or_else(|| {
            BrokerError::Config("neither XDG_STATE_HOME nor HOME is set: no place for the client key".into())
        })?;
        Some(ClientKey::load_or_create(&path).map_err(CliError::Proxy)?)
    } else {
        None
    };
    let key_path = key.as_ref().map(|k| k.path().display().to_string());
    let proxy = Proxy::bind("proxy", config, broker.clone(), key)
        .await
        .map_err(CliError::Proxy)?;
    let mut line = format!(
        "token-broker: proxy on http://{} -> {}",
        proxy.local_addr(),
        proxy.upstream()
    );
    match key_path {
        Some(path) => line.push_str(&format!("; clients send the key in {path} as their API key")),
        None => line.push_str("; no client key required"),
    }
    write_out(&format!("{line}\n"))?;
    let mut signal = None;
    proxy
        .run(async {
            signal = Some(signals.recv().await);
        })
        .await;
    tracing::info!(signal = signal.map(signal_name), "proxy stopped");
    Ok(())
}

/// `serve`: the daemon, in the foreground, until SIGTERM or SIGINT.
fn serve(creds: &CredentialArgs, explicit: &[&'static str]) -> Result<(), CliError> {
    if let Some(flag) = explicit.first() {
        return Err(CliError::Broker(BrokerError::Config(format!(
            "serve takes its profiles from the configuration, not {flag}"
        ))));
    }
    if creds.profile.is_some() {
        return Err(CliError::Broker(BrokerError::Config(
            "serve serves every profile of the configuration, not --profile".into(),
        )));
    }
    let flag = creds.config.clone();
    let config = Config::load(flag.as_deref()).map_err(CliError::Config)?;
    // Many clients at once (idle ones included): lift the soft descriptor limit.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(CliError::Output)?;
    runtime.block_on(async move {
        let mut signals = Signals::install().map_err(CliError::Output)?;
        let daemon = Daemon::bind(config).await.map_err(CliError::Serve)?;
        let profiles = daemon.profiles();
        let mut lines = format!(
            "token-broker: listening on {} ({} profile{}: {})\n",
            token_broker::store::display_path(daemon.socket()),
            profiles.len(),
            if profiles.len() == 1 { "" } else { "s" },
            profiles.join(", ")
        );
        for (name, addr, upstream) in daemon.proxies() {
            lines.push_str(&format!("token-broker: proxy {name} on http://{addr} -> {upstream}\n"));
        }
        if let Some(path) = daemon.client_key() {
            lines.push_str(&format!(
                "token-broker: proxy clients send the key in {} as their API key\n",
                path.display()
            ));
        }
        write_out(&lines)?;
        let control = daemon.control();
        let (stop, stopped) = tokio::sync::oneshot::channel::<i32>();
        tokio::spawn(async move {
            loop {
                let signal = signals.recv().await;
                if signal != libc::SIGHUP {
                    let _ = stop.send(signal);
                    // Later signals stay caught: the stop lets refreshes
                    // in flight reach the store.
                    loop {
                        let again = signals.recv().await;
                        tracing::warn!(signal = signal_name(again), "already stopping");
                    }
                }
                match Config::load(flag.as_deref()) {
                    Ok(config) => {
                        let report = control.reload(config).await;
                        tracing::info!(
                            started = ?report.started,
                            stopped = ?report.stopped,
                            restarted = ?report.restarted,
                            unchanged = report.unchanged.len(),
                            "reloaded the configuration"
                        );
                        for (name, why) in &report.failed {
                            tracing::warn!(profile = %name, error = %why, "the profile could not start");
                        }
                        for what in &report.ignored {
                            tracing::warn!("not applied until a restart: {what}");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "the configuration is not reloaded; the one in force stays"),
                }
            }
        });
        let result = daemon
            .run(async move {
                if let Ok(signal) = stopped.await {
                    tracing::info!(signal = signal_name(signal), "stopping");
                }
            })
            .await;
        result.map_err(CliError::Serve)
    })
}

/// The signals that end a command: caught, so that the broker can finish a
/// refresh in flight first.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal's number.
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => libc::SIGINT,
            _ = self.terminate.recv() => libc::SIGTERM,
            _ = self.hangup.recv() => libc::SIGHUP,
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

fn build(args: &CredentialArgs, keep_fresh: bool) -> Result<TokenBroker, BrokerError> {
    let usage = |m: &str| BrokerError::Config(m.to_owned());
    let dialect = Dialect::from(args.provider);
    let mut builder = match dialect {
        Dialect::Codex => TokenBroker::codex(),
        Dialect::OAuth2 => {
            let url = args
                .token_url
                .as_deref()
                .ok_or_else(|| usage("--provider oauth2 needs --token-url"))?;
            let id = args
                .client_id
                .as_deref()
                .ok_or_else(|| usage("--provider oauth2 needs --client-id"))?;
            if args.auth_file.is_none() {
                return Err(usage("--provider oauth2 needs --auth-file"));
            }
            TokenBroker::oauth2(url, id).client_auth(client_auth(args)?)
        }
    };
    if let Some(path) = &args.auth_file {
        builder = builder.credentials_path(path);
    }
    if let Some(url) = &args.token_url {
        builder = builder.token_url(url);
    }
    if let Some(id) = &args.client_id {
        builder = builder.client_id(id);
    }
    if dialect == Dialect::Codex && args.refresh_ahead <= token_broker::policy::CODEX_REFRESH_MARK {
        let _ = writeln!(
            std::io::stderr(),
            "token-broker: warning: --refresh-ahead {} is not before the Codex CLI's own 5-minute mark; \
             refreshing 5m30s before expiry instead (when the token lives long enough) so the Codex CLI never has to refresh",
            humantime::format_duration(args.refresh_ahead)
        );
    }
    builder
        .refresh_ahead(args.refresh_ahead)
        .http_timeout(args.timeout)
        .winner_wait(args.winner_wait)
        .keep_fresh(keep_fresh)
        .build()
}

fn client_auth(args: &CredentialArgs) -> Result<ClientAuth, BrokerError> {
    let secret = || -> Result<token_broker::credentials::Secret, BrokerError> {
        let var = args
            .client_secret_env
            .as_deref()
            .ok_or_else(|| BrokerError::Config("--client-auth basic|post needs --client-secret-env VAR".into()))?;
        match std::env::var(var) {
            Ok(value) if !value.is_empty() => Ok(token_broker::credentials::Secret::new(value)),
            _ => Err(BrokerError::Config(format!(
                "the environment variable {var} is not set or empty"
            ))),
        }
    };
    Ok(match args.client_auth {
        ClientAuthKind::None => ClientAuth::None,
        ClientAuthKind::Basic => ClientAuth::Basic(secret()?),
        ClientAuthKind::Post => ClientAuth::Post(secret()?),
    })
}

async fn print_token(broker: &TokenBroker, format: Format) -> Result<(), CliError> {
    let token = broker.token().await?;
    // A still-valid token is served even when the credential can no longer
    // be refreshed (or the last refresh failed): say so, or the first sign
    // of trouble is an outage when the token expires.
    // The refresh behind a token inside the refresh-ahead window runs on:
    // report how it ends (the token is printed either way, below).
    let mut status = broker.status().await.ok();
    while status.as_ref().is_some_and(|s| s.refreshing) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = broker.status().await.ok();
    }
    if let Some(error) = status.as_ref().and_then(|s| s.last_error.as_deref()) {
        let _ = writeln!(std::io::stderr(), "token-broker: warning: {error}");
    }
    let reply = match &status {
        Some(status) => TokenReply::with_status(token, status),
        None => TokenReply::from_token(token),
    };
    write_out(&format_token(&reply, format))
}

async fn print_status(broker: &TokenBroker, json: bool) -> Result<(), CliError> {
    let status = broker.status().await?;
    let now = SystemTime::now();
    let text = if json {
        format!("{}\n", status.to_json(now))
    } else {
        status.display_at(now).to_string()
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CliError::Output)
}

/// Asks for a token every `interval` and prints a line when it changes,
/// until `duration` passes or the process is interrupted.
async fn watch(
    broker: &TokenBroker,
    interval: Duration,
    duration: Option<Duration>,
    json: bool,
    signals: &mut Signals,
) -> Result<(), CliError> {
    // No representable deadline means none (the flag is bounded anyway).
    let deadline = duration.and_then(|d| tokio::time::Instant::now().checked_add(d));
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
    let ended = async move {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let mut ended = std::pin::pin!(ended);
    let mut last: Option<String> = None;
    let mut last_error: Option<BrokerError> = None;
    loop {
        // The deadline ends the watch even between two long ticks.
        tokio::select! {
            _ = ticker.tick() => {}
            _ = signals.recv() => break,
            _ = &mut ended => break,
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
        match broker.token().await {
            Ok(token) => {
                last_error = None;
                let fingerprint = token.fingerprint();
                if last.as_deref() == Some(fingerprint.as_str()) {
                    continue;
                }
                let status = broker.status().await?;
                let now = SystemTime::now();
                let line = if json {
                    serde_json::json!({
                        "at": token_broker::credentials::format_rfc3339(now),
                        "access_token_fingerprint": fingerprint,
                        "state": status.state,
                        "expires_at": status.expires_at.map(token_broker::credentials::format_rfc3339),
                        "token_requests": status.counters.token_requests,
                        "adoptions": status.counters.adoptions,
                    })
                    .to_string()
                } else {
                    format!(
                        "{} token sha256:{} {} expires {}",
                        token_broker::credentials::format_rfc3339(now),
                        fingerprint,
                        status.state,
                        status
                            .expires_at
                            .map(|at| token_broker::status::relative(at, now))
                            .unwrap_or_else(|| "never (unknown)".into())
                    )
                };
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")
                    .and_then(|()| out.flush())
                    .map_err(CliError::Output)?;
                last = Some(fingerprint);
            }
            Err(e) => {
                // A change of state is printed once: the same failure seen
                // again (with a new "retrying in" countdown) is not news.
                if last_error.as_ref().map(same_failure) != Some(same_failure(&e)) {
                    let _ = writeln!(std::io::stderr(), "{}", error_line(json, &CliError::Broker(e.clone())));
                }
                last_error = Some(e);
            }
        }
    }
    match last_error {
        Some(e) => Err(CliError::Reported(e)),
        None => Ok(()),
    }
}

/// An error without what changes while it lasts (the retry countdown, a
/// server's `Retry-After`), so that two sightings of one failure compare
/// equal.
fn same_failure(e: &BrokerError) -> BrokerError {
    match e {
        BrokerError::Unavailable { location, cause, .. } => BrokerError::Unavailable {
            location: location.clone(),
            cause: match cause {
                token_broker::provider::RefreshError::Transient { endpoint, kind, .. } => {
                    token_broker::provider::RefreshError::Transient {
                        endpoint: endpoint.clone(),
                        kind: kind.clone(),
                        retry_after: None,
                    }
                }
                rejected => rejected.clone(),
            },
            retry_in: None,
        },
        other => other.clone(),
    }
}

/// `simulate`: runs the load (twice with `--compare`) and prints the
/// summaries, with a live progress line on a terminal; with `--plot`, draws
/// the runs' timelines into an SVG.
async fn simulate(args: &SimulateArgs, json: bool) -> Result<(), CliError> {
    use token_broker::sim::scheduler::{Mode, SimulationConfig};

    // Many concurrent connections on loopback: lift the soft descriptor limit.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let modes: &[Mode] = match (args.compare, args.naive) {
        (true, _) => &[Mode::Naive, Mode::Broker],
        (false, true) => &[Mode::Naive],
        (false, false) => &[Mode::Broker],
    };
    let mut runs = Vec::new();
    for &mode in modes {
        let config = SimulationConfig {
            mode,
            jobs: args.jobs as usize,
            concurrency: args.concurrency as usize,
            token_lifetime: args.token_lifetime,
            duration: args.duration,
            latency: args.latency,
            fault_rate: args.fault_rate,
            fault_seed: args.fault_seed,
            revoke_family_on_reuse: args.revoke_on_reuse,
            ..SimulationConfig::default()
        };
        runs.push(simulate_once(config, !json && std::io::stderr().is_terminal()).await?);
    }
    if let Some(path) = &args.plot {
        cli::plot::write(path, &runs).map_err(|e| CliError::Plot(path.clone(), e))?;
    }
    let text = if json {
        // One summary as before; with --compare, an array of both.
        let value = match runs.as_slice() {
            [(summary, _)] => serde_json::to_value(summary),
            runs => serde_json::to_value(runs.iter().map(|(summary, _)| summary).collect::<Vec<_>>()),
        };
        format!("{}\n", value.map(|v| v.to_string()).unwrap_or_default())
    } else {
        let summaries: Vec<String> = runs.iter().map(|(summary, _)| summary.to_string()).collect();
        summaries.join("\n")
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CliError::Output)
}

/// One run of `simulate`, with a live progress line on stderr when `live`.
async fn simulate_once(
    config: token_broker::sim::scheduler::SimulationConfig,
    live: bool,
) -> Result<
    (
        token_broker::sim::scheduler::Summary,
        token_broker::sim::scheduler::Timeline,
    ),
    CliError,
> {
    use std::sync::atomic::Ordering;
    use token_broker::sim::scheduler::{self, Progress};

    let progress = std::sync::Arc::new(Progress::default());
    let ticker = live.then(|| {
        let progress = progress.clone();
        let total = config.duration;
        actix_rt::spawn(async move {
            let started = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let _ = write!(
                    std::io::stderr(),
                    "\r  {:>5.1}/{:.0} s  calls {:>9}  failed {:>7}",
                    started.elapsed().as_secs_f64().min(total.as_secs_f64()),
                    total.as_secs_f64(),
                    progress.calls.load(Ordering::Relaxed),
                    progress.failed.load(Ordering::Relaxed),
                );
            }
        })
    });
    let run = scheduler::run_recorded(config, progress)
        .await
        .map_err(CliError::Simulation);
    if let Some(ticker) = ticker {
        ticker.abort();
        let _ = write!(std::io::stderr(), "\r{:60}\r", "");
    }
    run
}

fn fail(json: bool, e: &CliError) -> ExitCode {
    if !matches!(e, CliError::Reported(_)) {
        let _ = writeln!(std::io::stderr(), "{}", error_line(json, e));
    }
    ExitCode::from(exit_code(e) as u8)
}

fn exit_code(e: &CliError) -> i32 {
    match e {
        CliError::Broker(e) | CliError::Reported(e) => cli::exit_code(e),
        CliError::Output(_)
        | CliError::Simulation(_)
        | CliError::Plot(..)
        | CliError::Unfinished(_)
        | CliError::Serve(_)
        | CliError::Proxy(_) => 1,
        CliError::Interrupted(signal) => 128 + signal,
        CliError::Config(_) => 2,
        CliError::NoDaemon { .. } => 5,
        CliError::Daemon(e) => cli::daemon_exit_code(e),
    }
}

/// The one line that reports `e` on stderr: text, or JSON with `--json`.
fn error_line(json: bool, e: &CliError) -> String {
    let (kind, message) = match e {
        CliError::Broker(e) | CliError::Reported(e) => (cli::kind(e), e.to_string()),
        CliError::Output(e) => ("io", format!("could not write the output: {e}")),
        CliError::Simulation(e) => ("simulation", format!("the simulation failed: {e}")),
        CliError::Plot(path, e) => (
            "plot",
            format!(
                "could not write the plot to {}: {e}",
                token_broker::store::display_path(path)
            ),
        ),
        CliError::Interrupted(signal) => (
            "interrupted",
            format!("interrupted by {}; no refresh was cut short", signal_name(*signal)),
        ),
        CliError::Config(e) => ("config", e.to_string()),
        CliError::NoDaemon { socket, why } => (
            "no_daemon",
            format!(
                "no token-broker daemon answers on {} ({why}): start `token-broker serve`, or use --daemon auto",
                token_broker::store::display_path(socket)
            ),
        ),
        CliError::Daemon(e) => (cli::daemon_kind(e), e.to_string()),
        CliError::Serve(e) => ("serve", e.to_string()),
        CliError::Proxy(e) => ("proxy", e.to_string()),
        CliError::Unfinished(bound) => (
            "unfinished",
            format!(
                "a refresh was still in flight after {}; its rotated tokens may be lost",
                humantime::format_duration(*bound)
            ),
        ),
    };
    if json {
        serde_json::json!({"error": {"kind": kind, "message": message, "exit_code": exit_code(e)}}).to_string()
    } else {
        format!("token-broker: {message}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags' defaults are written out for `--help`; they must stay the
    /// library's.
    #[test]
    fn flag_defaults_are_the_library_defaults() {
        use token_broker::defaults::{DEFAULT_HTTP_TIMEOUT, DEFAULT_REFRESH_AHEAD, DEFAULT_WINNER_WAIT};
        let cli = Cli::try_parse_from(["token-broker", "status"]).unwrap();
        assert_eq!(cli.creds.refresh_ahead, DEFAULT_REFRESH_AHEAD);
        assert_eq!(cli.creds.timeout, DEFAULT_HTTP_TIMEOUT);
        if std::env::var_os("TOKEN_BROKER_WINNER_WAIT").is_none() {
            assert_eq!(cli.creds.winner_wait, DEFAULT_WINNER_WAIT);
        }
        assert_eq!(Dialect::from(cli.creds.provider), Dialect::Codex);
    }
}
