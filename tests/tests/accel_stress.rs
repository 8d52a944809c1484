//! The CI pass of the randomized stress harness (`fastpath_tests::stress`): at least 300
//! cases over both paths, within 4 minutes. The seed base is printed; `STRESS_SEED` repeats a
//! run and `STRESS_REPLAY` runs one case. `scripts/soak.sh` runs the long pass.
use fastpath_tests::stress::{Bench, Case, PathKind, clock_seed, run_cases};
use std::time::Duration;

#[test]
fn randomized_transfers_keep_every_byte_in_order() {
    if !fastpath_tests::require_privileges("randomized_transfers_keep_every_byte_in_order") {
        return;
    }
    let paths = [PathKind::Direct, PathKind::Direct, PathKind::Sidecar];
    let mut bench = Bench::new(
        "stress",
        true,
        fastpath_common::DEFAULT_QUEUE_LIMIT_BYTES,
        true,
    );
    if let Some(seed) = std::env::var("STRESS_REPLAY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        let case = Case::from_seed(seed, &paths);
        eprintln!("stress: replaying {case:?}");
        if let Err(f) = bench.run(&case) {
            panic!("seed {}: {}", f.seed, f.what);
        }
        return;
    }
    let base = std::env::var("STRESS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(clock_seed);
    eprintln!("stress: seed base {base} (STRESS_SEED={base} repeats this run)");
    let (ran, failures) = run_cases(
        &mut bench,
        base,
        300,
        &paths,
        Duration::from_secs(230),
        false,
    );
    eprintln!("stress: {ran} cases, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{} of {ran} cases failed (seed base {base}); first: seed {}: {}",
        failures.len(),
        failures[0].seed,
        failures[0].what
    );
    assert!(ran >= 300, "only {ran} cases ran within the time limit");
}
