//! The stress harness's long pass (`scripts/soak.sh`): `stress [--cases N] [--seed BASE]
//! [--minutes M] [--direct-only] [--plain] [--replay SEED]`. Prints every failure with the
//! seed that replays it, then one line `N passed, N failed`; exits 1 on any failure.
//! `--plain` runs the same cases with nothing enrolled (plain TCP through the same sidecars
//! and rules): a seed that fails there too is a case that plain TCP fails, not the product.
use fastpath_tests::stress::{Bench, Case, PathKind, clock_seed, run_cases};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let cases: u64 = value("--cases")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let minutes: u64 = value("--minutes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let paths: &[PathKind] = if args.iter().any(|a| a == "--direct-only") {
        &[PathKind::Direct]
    } else {
        &[PathKind::Direct, PathKind::Direct, PathKind::Sidecar]
    };
    let base: u64 = value("--seed")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(clock_seed);
    let accelerated = !args.iter().any(|a| a == "--plain");
    let mut bench = Bench::new(
        "soak",
        true,
        fastpath_common::DEFAULT_QUEUE_LIMIT_BYTES,
        accelerated,
    );
    if let Some(seed) = value("--replay").and_then(|v| v.parse().ok()) {
        let case = Case::from_seed(seed, paths);
        eprintln!("replaying {case:?}");
        let res = bench.run(&case);
        match res {
            Ok(()) => println!("1 passed, 0 failed"),
            Err(f) => {
                println!("0 passed, 1 failed: {}", f.what);
                std::process::exit(1);
            }
        }
        return;
    }
    eprintln!("stress: seed base {base}, up to {cases} cases, {minutes} min");
    let started = std::time::Instant::now();
    let (ran, failures) = run_cases(
        &mut bench,
        base,
        cases,
        paths,
        Duration::from_secs(minutes * 60),
        true,
    );
    eprintln!(
        "stress: {ran} cases in {:.0} s (seed base {base})",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{} passed, {} failed",
        ran - failures.len() as u64,
        failures.len()
    );
    if !failures.is_empty() {
        std::process::exit(1);
    }
}
