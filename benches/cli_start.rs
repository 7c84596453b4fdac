//! CLI start-up: `token-broker token` with a valid token, as a whole process,
//! beside `cat` of the same file. The broker builds nothing a valid token
//! does not need (no HTTP client, no TLS roots).
//!
//! Goal: at most 5 ms more than `cat`.

use std::path::Path;
use std::process::{Command, Stdio};

use criterion::{criterion_group, criterion_main, Criterion};

fn run(cmd: &mut Command) {
    let status = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
    assert!(status.success());
}

fn cli_start(c: &mut Criterion) {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sample-auth.json");
    let cli = env!("CARGO_BIN_EXE_token-broker");
    let mut group = c.benchmark_group("cli_start");
    group.sample_size(200);
    group.bench_function("token-broker token (valid token)", |b| {
        b.iter(|| {
            run(Command::new(cli)
                .arg("token")
                .arg("--auth-file")
                .arg(&file)
                .env_remove("RUST_LOG"))
        })
    });
    group.bench_function("cat (same file)", |b| b.iter(|| run(Command::new("cat").arg(&file))));
    group.finish();
}

criterion_group!(benches, cli_start);
criterion_main!(benches);
