//! The examples run here, so they never rot: each example's `run` is the
//! whole example but for its argument parsing and printing, and these
//! tests call it with a short duration and check what it checks.

#[allow(dead_code)]
#[path = "../examples/cron_scheduler.rs"]
mod cron_scheduler;

#[allow(dead_code)]
#[path = "../examples/actix_actors.rs"]
mod actix_actors;

use std::time::Duration;

#[test]
fn cron_scheduler_jobs_cost_one_token_request_per_expiry() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let outcome = runtime.block_on(cron_scheduler::run(Duration::from_secs(3))).unwrap();
    assert!(outcome.one_request_per_expiry(), "{outcome:?}");
}

#[test]
fn actix_actors_cost_one_token_request_per_replaced_token() {
    let outcome = actix_rt::System::new()
        .block_on(actix_actors::run(Duration::from_secs(3)))
        .unwrap();
    // Halfway through, the provider revoked the current token: the request
    // actors that held it rejected it and retried; none failed.
    assert!(outcome.one_request_per_token(), "{outcome:?}");
}
