//! One refresh cycle: under the store's cross-process lock, re-read the
//! store, adopt what someone else wrote, or spend the refresh token once and
//! durably write the result before anyone hears of it.
//!
//! Only [`TokenActor`](super::TokenActor) runs a cycle, and never two at once
//! for one credential.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use tracing::{debug, info, warn};

use super::machine::Begin;
use super::Config;
use crate::credentials::{RefreshToken, TokenSet};
use crate::error::BrokerError;
use crate::policy::{freshness, Freshness};
use crate::store::{Changes, Loaded, StoreError, StoreLock, Takeover, Version};

/// Rotated tokens a refresh returned that could not be written yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Unsaved {
    /// The new tokens.
    pub tokens: TokenSet,
    /// The tokens they replace: they are written only over exactly these.
    pub replaces: TokenSet,
}

/// How a cycle ended.
pub(crate) enum CycleOutcome {
    /// Someone else wrote newer usable tokens; no request was made.
    Adopted(TokenSet, Option<Version>),
    /// The refresh token was spent and the new tokens are on disk.
    Refreshed(TokenSet, Option<Version>),
    /// The store holds what the actor holds and nothing needed doing.
    Unchanged(Option<Version>),
    /// The provider refused the refresh token (or there is none).
    LoginRequired {
        reason: String,
        dead_refresh: Option<RefreshToken>,
        version: Option<Version>,
    },
    /// A refresh succeeded but its tokens could not be written. The
    /// brokers' lock comes back with them: it stays held until they are
    /// written, so that no other broker (in any process, pid namespace or
    /// container) can take our refresh for a crash and spend the old token.
    Unsaved(Box<Unsaved>, Option<StoreLock>, BrokerError),
    /// Nothing changed; the error says why (transient, store, account).
    Failed(BrokerError),
}

/// Releases the brokers' lock, if `slot` still holds it.
async fn release(slot: &mut Option<StoreLock>) {
    if let Some(lock) = slot.take() {
        if let Err(e) = lock.release().await {
            warn!(error = %e, "could not release the brokers' lock");
        }
    }
}

/// How a cycle ended, and whether it found the store moved past the
/// unwritten tokens it was given (they are stale then: never to be written).
pub(crate) struct CycleEnd {
    pub outcome: CycleOutcome,
    pub unsaved_abandoned: bool,
}

/// Runs one cycle with what the state machine says the actor knows
/// (`input`) and, when unwritten tokens are to be written, the brokers' lock
/// still held since their refresh (`held_lock`).
pub(crate) async fn run(cfg: Arc<Config>, input: Begin, held_lock: Option<StoreLock>) -> CycleEnd {
    let mut unsaved_abandoned = false;
    let outcome = match run_inner(&cfg, input, held_lock, &cfg.requests, &mut unsaved_abandoned).await {
        Ok(outcome) => outcome,
        Err(e) => CycleOutcome::Failed(e),
    };
    CycleEnd {
        outcome,
        unsaved_abandoned,
    }
}

async fn run_inner(
    cfg: &Arc<Config>,
    input: Begin,
    held_lock: Option<StoreLock>,
    requests: &AtomicU64,
    unsaved_abandoned: &mut bool,
) -> Result<CycleOutcome, BrokerError> {
    // The lock covers re-read, refresh and write; it is released when the
    // cycle ends (or earlier, before waiting for a winner), on every path
    // but one: tokens that could not be written, which keep it until they
    // are.
    let lock = match held_lock {
        Some(lock) => lock,
        None => take_lock(cfg, input.unsaved.is_some()).await?,
    };
    let mut slot = Some(lock);
    let result = locked(cfg, input, &mut slot, requests, unsaved_abandoned).await;
    release(&mut slot).await;
    result
}

/// The cycle once the lock is taken. `slot` holds the lock: taken out to
/// release it early or to keep it with unwritten tokens.
async fn locked(
    cfg: &Arc<Config>,
    input: Begin,
    slot: &mut Option<StoreLock>,
    requests: &AtomicU64,
    unsaved_abandoned: &mut bool,
) -> Result<CycleOutcome, BrokerError> {
    let read = async {
        let loaded = cfg.store.load().await?;
        let marker = cfg.store.interrupted_refresh().await?;
        Ok::<_, StoreError>((loaded, marker))
    };
    let (on_disk, version, marker) = match read.await {
        Ok((Loaded { tokens, version }, marker)) => (tokens, version, marker),
        Err(e) => return keep_unsaved(input.unsaved, slot, e.into()),
    };

    if let (Some(held), Some(now)) = (&input.held.account_id, &on_disk.account_id) {
        if held != now {
            *unsaved_abandoned = input.unsaved.is_some();
            warn!("the credentials now belong to another account; spending nothing");
            return Err(BrokerError::AccountChanged {
                location: cfg.rules.location.clone(),
            });
        }
    }
    let changed = on_disk.differs_from(&input.held);

    // Our own earlier refresh whose tokens could not be written: write them
    // now (this also clears its record) over exactly what they replace,
    // unless someone has written the store since.
    if let Some(unsaved) = input.unsaved {
        // Already written (a store that keeps a spool of them landed it).
        if !on_disk.differs_from(&unsaved.tokens) {
            if let Err(e) = cfg.store.clear_refreshing().await {
                warn!(error = %e, "could not remove the refresh-in-progress record");
            }
            info!(access = %on_disk.access_token.fingerprint(), "the new tokens from an earlier refresh are stored now");
            return Ok(CycleOutcome::Refreshed(on_disk, Some(version)));
        }
        if !on_disk.differs_from(&unsaved.replaces) {
            return save(cfg, unsaved.tokens, on_disk, version, slot).await;
        }
        *unsaved_abandoned = true;
        warn!("tokens from an earlier refresh were never written, and someone else has since changed the store; adopting theirs");
    }

    // A refresh-in-progress record found while we hold the lock was left by
    // a holder that died, or by a live one that spent the token and could
    // not write the result yet. It matters only if it names the refresh
    // token on disk: that token may already be spent.
    let on_disk_hash = on_disk.refresh_token.as_ref().map(|t| t.sha256_hex());
    let mut live_holder = None;
    let interrupted = match marker {
        Some(record) if Some(&record.refresh_token_sha256) == on_disk_hash.as_ref() => {
            if record.holder_alive && !record.mine {
                live_holder = Some(record.holder_pid);
                false
            } else {
                warn!("an earlier refresh of this refresh token was interrupted before its result was saved");
                true
            }
        }
        Some(_) => {
            cfg.store.clear_refreshing().await?;
            false
        }
        None => false,
    };

    // The broker's clock, as the machine that started this cycle used.
    let now = cfg.clock.now();
    let rejected = input.rejected.as_ref() == Some(&on_disk.access_token);
    let state = freshness(&on_disk, now, cfg.rules.policy);
    if !rejected && matches!(state, Freshness::Fresh { .. } | Freshness::Unknown) {
        return Ok(if changed {
            info!(access = %on_disk.access_token.fingerprint(), "adopting tokens written by someone else");
            CycleOutcome::Adopted(on_disk, Some(version))
        } else {
            CycleOutcome::Unchanged(Some(version))
        });
    }
    let Some(refresh_token) = on_disk.refresh_token.clone() else {
        return Ok(CycleOutcome::LoginRequired {
            reason: "the credentials have no refresh token".into(),
            dead_refresh: None,
            version: Some(version),
        });
    };
    if input.dead_refresh.as_ref() == Some(&refresh_token) {
        return Ok(CycleOutcome::LoginRequired {
            reason: "the provider already rejected this refresh token".into(),
            dead_refresh: Some(refresh_token),
            version: Some(version),
        });
    }
    // A running broker spent this token and holds the new tokens, unwritten
    // so far: spending it again would burn the credential. Wait for its
    // write; if it does not come, try again later.
    if let Some(pid) = live_holder {
        release(slot).await;
        info!(
            pid,
            "a running broker spent this refresh token and has not written the result yet; waiting"
        );
        let deadline = SystemTime::now() + cfg.winner_wait;
        return match wait_for_winner(cfg, &on_disk, deadline, String::new(), refresh_token).await? {
            CycleOutcome::LoginRequired { .. } => Err(BrokerError::Unavailable {
                location: cfg.rules.location.clone(),
                cause: crate::provider::RefreshError::Transient {
                    endpoint: cfg.provider.token_url().to_owned(),
                    kind: crate::provider::Failure::UnsavedElsewhere(pid),
                    retry_after: None,
                },
                retry_in: None,
            }),
            other => Ok(other),
        };
    }
    // Another broker on this store saw the provider refuse this very token:
    // never send it again. Whoever won may still be writing their tokens.
    let key = refused_key(cfg, &refresh_token);
    if let Some(refused) = cfg.store.refused_at(&key).await? {
        release(slot).await;
        info!(refresh = %refresh_token.fingerprint(), "another broker saw the provider refuse this refresh token; waiting for the winner's tokens");
        let deadline = crate::policy::later(refused, cfg.winner_wait);
        let reason = "the provider refused this refresh token (seen by another broker on this file), \
                      and no newer tokens arrived"
            .to_owned();
        return wait_for_winner(cfg, &on_disk, deadline, reason, refresh_token).await;
    }

    // A writer killed between writing its temporary file and renaming it
    // left the rotated tokens there: adopt them rather than spending the
    // old refresh token again.
    if interrupted {
        if let Some(orphan) = cfg.store.recover_interrupted().await {
            let same_account = orphan.account_id == on_disk.account_id;
            let newer = orphan.refresh_token.is_some() && orphan.refresh_token != on_disk.refresh_token;
            if same_account && newer {
                warn!(access = %orphan.access_token.fingerprint(), "recovering the tokens an interrupted refresh left in its temporary file");
                return Ok(match save(cfg, orphan, on_disk, version, slot).await? {
                    CycleOutcome::Refreshed(tokens, version) => CycleOutcome::Adopted(tokens, version),
                    other => other,
                });
            }
        }
    }

    // An interrupted refresh elsewhere, under a store whose policy is to
    // wait: while the access token still works, spend nothing (the
    // holder's late write may yet land, and a reuse may revoke the whole
    // token family); once it has expired, nothing else can help.
    if interrupted && !rejected && cfg.store.takeover() == Takeover::Wait && state.is_usable() {
        warn!("an interrupted refresh was found; the takeover policy is to wait while the access token is valid");
        return Err(BrokerError::Unavailable {
            location: cfg.rules.location.clone(),
            cause: crate::provider::RefreshError::Transient {
                endpoint: cfg.provider.token_url().to_owned(),
                kind: crate::provider::Failure::InterruptedElsewhere,
                retry_after: None,
            },
            retry_in: None,
        });
    }

    // Shutting down: spend nothing new (a refresh already spent is
    // finished and written; this one has not started).
    if cfg.stopping.load(Ordering::SeqCst) {
        return Err(BrokerError::Stopped {
            location: cfg.rules.location.clone(),
        });
    }

    // Wait for the token endpoint's permit (at most so many requests in
    // flight per endpoint, none while it asked every client to wait) before
    // anything is recorded or sent; a shutdown ends the wait.
    let mut permit = Some(permit(cfg).await?);

    crate::failpoint::hit("refresh-before-record");
    // Record the attempt before the token leaves the process: if we are
    // killed before saving the result, the next holder of the lock knows.
    cfg.store.mark_refreshing(&refresh_token).await?;
    crate::failpoint::hit("refresh-after-record");
    // Why an earlier attempt may have spent this refresh token unheard.
    let mut interrupted_by: Option<String> =
        interrupted.then(|| "an earlier attempt ended before its result was saved".to_owned());
    let mut attempt = 1;
    loop {
        // A retry after an unknown outcome is not started once a shutdown
        // was asked for: the record stays, and the next start settles it.
        if attempt > 1 && cfg.stopping.load(Ordering::SeqCst) {
            return Err(BrokerError::Stopped {
                location: cfg.rules.location.clone(),
            });
        }
        if permit.is_none() {
            // A retry: the first attempt may have spent the token, so the
            // record stays whatever happens here.
            permit = Some(self::permit(cfg).await?);
        }
        // The last moment before the token leaves: is the lock still ours,
        // and for long enough to hear the answer? (A file lock whose lock
        // file was deleted or replaced; a lease that lapsed, or will lapse
        // before the request can time out.)
        let needed = cfg.provider.timeout().saturating_add(crate::defaults::TIMEOUT_GRACE);
        let held = slot
            .as_ref()
            .is_some_and(|lock| lock.is_valid() && lock.valid_for().is_none_or(|left| left > needed));
        if !held {
            warn!("the brokers' lock is no longer held (its lock file was deleted or replaced, or its lease lapsed); spending nothing and trying again");
            if attempt == 1 {
                // Our record, for a token we did not send: remove it, unless
                // a broker that got in meanwhile has replaced it with its own.
                match cfg.store.interrupted_refresh().await? {
                    Some(record) if record.mine => cfg.store.clear_refreshing().await?,
                    _ => {}
                }
            }
            return Err(BrokerError::Unavailable {
                location: cfg.rules.location.clone(),
                cause: crate::provider::RefreshError::Transient {
                    endpoint: cfg.provider.token_url().to_owned(),
                    kind: crate::provider::Failure::LockLost,
                    retry_after: None,
                },
                retry_in: None,
            });
        }
        requests.fetch_add(1, Ordering::Relaxed);
        info!(refresh = %refresh_token.fingerprint(), ?state, rejected, attempt, "spending the refresh token");
        let answer = cfg.provider.send(&refresh_token, &*cfg.clock).await;
        // The endpoint's next request may go.
        drop(permit.take());
        let error = match answer {
            Ok(refreshed) => {
                crate::failpoint::hit("refresh-after-response");
                return save(
                    cfg,
                    refreshed.into_token_set(&on_disk, SystemTime::now()),
                    on_disk,
                    version,
                    slot,
                )
                .await;
            }
            Err(e) => e,
        };
        if error.refuses_refresh_token() {
            // The refresh token was spent elsewhere (or revoked). The winner
            // may be committing its tokens right now: release everything and
            // give it time before declaring a sign-in necessary.
            warn!(%error, "the provider refused the refresh token; waiting for the winner's tokens");
            let key = refused_key(cfg, &refresh_token);
            cfg.store.record_refused(&key).await?;
            cfg.store.clear_refreshing().await?;
            release(slot).await;
            let reason = match &interrupted_by {
                Some(how) => format!(
                    "an earlier refresh was interrupted ({how}) before its new tokens were saved, \
                     and the provider now refuses the old refresh token: {error}"
                ),
                None => error.to_string(),
            };
            let deadline = crate::policy::later(SystemTime::now(), cfg.winner_wait);
            return wait_for_winner(cfg, &on_disk, deadline, reason, refresh_token).await;
        }
        if error.is_permanent() {
            warn!(%error, "the provider rejected the refresh request; re-reading the store once");
            // The outcome is known: the record has done its job.
            cfg.store.clear_refreshing().await?;
            let Loaded { tokens: again, version } = cfg.store.load().await?;
            if again.differs_from(&on_disk) {
                info!("someone else refreshed meanwhile; adopting their tokens");
                return adopt_theirs(cfg, &on_disk, again, version);
            }
            let reason = match &interrupted_by {
                Some(how) => format!(
                    "an earlier refresh was interrupted ({how}) before its new tokens were saved, \
                     and the provider now refuses the old refresh token: {error}"
                ),
                None => error.to_string(),
            };
            return Ok(CycleOutcome::LoginRequired {
                reason,
                dead_refresh: Some(refresh_token),
                version: Some(version),
            });
        }
        if error.outcome_unknown() && attempt == 1 {
            // The provider may have rotated the token without our hearing
            // back. Still holding the lock: has another writer moved on?
            warn!(%error, "the refresh outcome is unknown; re-reading the store, then retrying once");
            let Loaded { tokens: again, version } = cfg.store.load().await?;
            if again.differs_from(&on_disk) {
                cfg.store.clear_refreshing().await?;
                return adopt_theirs(cfg, &on_disk, again, version);
            }
            // Many providers accept a just-rotated token again for a short
            // grace period and return the same new tokens.
            tokio::time::sleep(UNKNOWN_OUTCOME_RETRY_DELAY).await;
            interrupted_by = Some(error.to_string());
            attempt += 1;
            continue;
        }
        // The record stays when the request may have reached the provider.
        if !error.outcome_unknown() && interrupted_by.is_none() {
            cfg.store.clear_refreshing().await?;
        }
        warn!(%error, "refresh failed; will retry with backoff");
        return Err(BrokerError::Unavailable {
            location: cfg.rules.location.clone(),
            cause: error,
            retry_in: None,
        });
    }
}

/// A permit to send one token request to the endpoint (see
/// [`provider::limit`](crate::provider::limit)); nothing was sent when it
/// is refused.
async fn permit(cfg: &Config) -> Result<Option<crate::provider::limit::Permit>, BrokerError> {
    cfg.provider
        .permit(Some(&cfg.stopping), &*cfg.clock)
        .await
        .map_err(|cause| BrokerError::Unavailable {
            location: cfg.rules.location.clone(),
            cause,
            retry_in: None,
        })
}

/// A cycle that could not even read the store: unwritten tokens it was
/// given stay unwritten, and keep the lock; without them the error stands.
fn keep_unsaved(
    unsaved: Option<Unsaved>,
    slot: &mut Option<StoreLock>,
    error: BrokerError,
) -> Result<CycleOutcome, BrokerError> {
    match unsaved {
        Some(unsaved) => Ok(CycleOutcome::Unsaved(
            Box::new(unsaved),
            slot.take(),
            after_spend(error),
        )),
        None => Err(error),
    }
}

/// Takes the brokers' lock, in slices, so that a shutdown asked for while
/// another broker holds it ends the wait at once, before anything is spent.
/// A cycle that only writes tokens already paid for (`write_only`) goes on.
async fn take_lock(cfg: &Arc<Config>, write_only: bool) -> Result<StoreLock, BrokerError> {
    let deadline = crate::policy::instant_after(cfg.lock_timeout);
    loop {
        if !write_only && cfg.stopping.load(Ordering::SeqCst) {
            return Err(BrokerError::Stopped {
                location: cfg.rules.location.clone(),
            });
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match cfg.store.lock(left.min(LOCK_SLICE)).await {
            // A slice ended with time left: try again (and look at `stopping`).
            Err(StoreError::LockTimeout { .. }) if left > LOCK_SLICE => {}
            Err(StoreError::LockTimeout { location, .. }) => {
                return Err(BrokerError::Store(StoreError::LockTimeout {
                    location,
                    waited: cfg.lock_timeout,
                }))
            }
            other => return other.map_err(BrokerError::from),
        }
    }
}

/// The key under which a refusal of `refresh_token` is recorded: the
/// SHA-256 of the endpoint, the client id and the token. Only brokers that
/// would send the same request honour it.
fn refused_key(cfg: &Config, refresh_token: &RefreshToken) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in [
        cfg.provider.token_url(),
        cfg.provider.client_id(),
        refresh_token.expose(),
    ] {
        hash.update(part.as_bytes());
        hash.update([0u8]);
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// How long one attempt to take the brokers' lock waits.
const LOCK_SLICE: Duration = Duration::from_millis(200);

/// After the provider refused `refused` (spent by someone else, the winner),
/// watches the store until `deadline` for the winner's tokens and adopts
/// them; holds no lock meanwhile, so the winner can write. Only when nothing
/// arrives is a sign-in required.
async fn wait_for_winner(
    cfg: &Arc<Config>,
    on_disk: &TokenSet,
    deadline: SystemTime,
    reason: String,
    refused: RefreshToken,
) -> Result<CycleOutcome, BrokerError> {
    // Subscribed before the first look, so that nothing written after it
    // goes unnoticed.
    let mut changes = cfg.store.changes(WINNER_POLL);
    let mut seen = None;
    let mut look = true;
    loop {
        if look {
            look = false;
            // A file caught mid-write, or briefly unreadable, is looked at
            // again on the next change; only usable tokens end the wait.
            if let Ok(Loaded { tokens: again, version }) = cfg.store.load().await {
                seen = Some(version.clone());
                if again.differs_from(on_disk) {
                    if let (Some(held), Some(now)) = (&on_disk.account_id, &again.account_id) {
                        if held != now {
                            warn!("the credentials now belong to another account; spending nothing");
                            return Err(BrokerError::AccountChanged {
                                location: cfg.rules.location.clone(),
                            });
                        }
                    }
                    info!(access = %again.access_token.fingerprint(), "the winner's tokens arrived; adopting them");
                    return Ok(CycleOutcome::Adopted(again, Some(version)));
                }
            }
        }
        let now = SystemTime::now();
        if now >= deadline {
            return Ok(CycleOutcome::LoginRequired {
                reason,
                dead_refresh: Some(refused),
                version: seen,
            });
        }
        let left = deadline.duration_since(now).unwrap_or_default();
        tokio::select! {
            event = changes.next() => match event {
                Some(_) => look = true,
                // A store whose notifications ended: look every WINNER_POLL.
                None => changes = Changes::every(WINNER_POLL),
            },
            _ = tokio::time::sleep(left) => {}
        }
    }
}

/// How often the store is checked while waiting for a winner's tokens where
/// it cannot notify (one `stat` each, for a file).
const WINNER_POLL: Duration = Duration::from_millis(20);

/// Writes freshly refreshed tokens over `replaces` (loaded as version
/// `expected`); only once this succeeds may anyone see them.
async fn save(
    cfg: &Arc<Config>,
    tokens: TokenSet,
    replaces: TokenSet,
    mut expected: Version,
    slot: &mut Option<StoreLock>,
) -> Result<CycleOutcome, BrokerError> {
    let mut attempt = 0;
    let mut rewrites = 0;
    let written = loop {
        match cfg.store.save(&tokens, &expected).await {
            Ok(version) => break Ok(version),
            Err(StoreError::Conflict { .. }) => {
                let theirs = match cfg.store.load().await {
                    Ok(theirs) => theirs,
                    // Cannot tell who wrote: keep ours, unwritten, and the lock.
                    Err(e) => break Err(e),
                };
                if !theirs.tokens.differs_from(&replaces) && rewrites < MAX_REWRITES {
                    // Rewritten with the very tokens ours replace (a store
                    // whose versions count writes, not tokens): still ours
                    // to replace.
                    rewrites += 1;
                    expected = theirs.version;
                    continue;
                }
                warn!("another writer replaced the tokens during the refresh; keeping theirs");
                cfg.store.clear_refreshing().await?;
                return adopt_theirs(cfg, &replaces, theirs.tokens, theirs.version);
            }
            // A full disk or a passing I/O error: try again while still
            // holding the lock, before anyone else can mistake our record
            // for a crash.
            Err(e) if attempt < SAVE_RETRIES.len() => {
                warn!(error = %e, attempt = attempt + 1, "could not write the new tokens; trying again");
                tokio::time::sleep(SAVE_RETRIES[attempt]).await;
                attempt += 1;
            }
            Err(e) => break Err(e),
        }
    };
    match written {
        Ok(version) => {
            crate::failpoint::hit("refresh-after-write");
            if let Err(e) = cfg.store.clear_refreshing().await {
                warn!(error = %e, "could not remove the refresh-in-progress record");
            }
            debug!(access = %tokens.access_token.fingerprint(), "new tokens are on disk");
            Ok(CycleOutcome::Refreshed(tokens, Some(version)))
        }
        Err(e) => {
            warn!(error = %e, "could not write the new tokens; keeping them in memory, and the lock, and retrying");
            Ok(CycleOutcome::Unsaved(
                Box::new(Unsaved { tokens, replaces }),
                slot.take(),
                after_spend(e.into()),
            ))
        }
    }
}

/// Tokens someone else wrote, found by a re-read during the cycle: adopted,
/// unless they belong to another account than `ours` (then nothing is
/// served, as when the cycle finds them under the lock at its start).
fn adopt_theirs(
    cfg: &Config,
    ours: &TokenSet,
    theirs: TokenSet,
    version: Version,
) -> Result<CycleOutcome, BrokerError> {
    if let (Some(held), Some(now)) = (&ours.account_id, &theirs.account_id) {
        if held != now {
            warn!("the credentials now belong to another account; not adopting them");
            return Err(BrokerError::AccountChanged {
                location: cfg.rules.location.clone(),
            });
        }
    }
    Ok(CycleOutcome::Adopted(theirs, Some(version)))
}

/// How many times a save goes on over a store rewritten with the very
/// tokens it replaces.
const MAX_REWRITES: u32 = 3;

/// Pauses between the attempts to write new tokens, lock held.
const SAVE_RETRIES: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_secs(1),
];

/// A store error met after the refresh token was spent is a failure to
/// write (exit 1), whatever its cause: "the file is invalid" (exit 3)
/// promises that nothing happened, which is no longer true.
fn after_spend(e: BrokerError) -> BrokerError {
    match e {
        BrokerError::Store(
            StoreError::Invalid { location, .. }
            | StoreError::NotFound { location }
            | StoreError::Unreadable { location, .. }
            | StoreError::TooLarge { location, .. },
        ) => BrokerError::Store(StoreError::Write {
            cause: "the file could no longer be read as credentials (someone changed it while the refresh \
                    was under way); the new tokens are kept in memory and written once it can be read again"
                .to_owned(),
            location,
        }),
        other => other,
    }
}

/// How long to wait before the one retry of a refresh whose outcome is unknown.
const UNKNOWN_OUTCOME_RETRY_DELAY: Duration = Duration::from_millis(200);
