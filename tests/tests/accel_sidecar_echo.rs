//! The echo a user met (issue: truncation at demotion): HAProxy 2.6 sidecars in both pods,
//! Istio's rules, 2 connections at once, each writing 4 MiB of random data in writes of 1 B
//! to 256 KiB right after connect, reading the echo concurrently, and half-closing after its
//! last write; the echo server echoes until EOF, then half-closes. Accelerated it must be
//! intact in 200 of 200 runs, and so must the plain control (same sidecars and rules, nothing
//! enrolled), which proves the harness itself loses nothing.
//!
//! The sidecars poll edge-triggered ([`SidecarPolling::EdgeTriggered`]). Debian's HAProxy 2.6
//! with its default level-triggered polling cuts an echo short by itself now and then, with
//! no accelerator on the node: CI saw 1 in 400 plain echoes end early, the sidecars' logs
//! showing every byte read on one hop and fewer delivered on the next, with only normal
//! closes and no reset sent in either pod, which plain TCP cannot do. Such a failure would
//! hide the product's among the harness's, so this test uses the stand-in without that
//! defect and allows no failure at all. ECHO_SIDECAR_POLLING=default runs HAProxy's own
//! polling, to watch the stand-in's defect.
//!
//! What first showed the product's defect here (a proxy that takes a short read after the
//! FIN as the end of the stream, meeting two receive queues at once after a demotion) is
//! tested exactly, with no proxy and no timing, by
//! `a_proxy_that_takes_a_short_read_after_the_fin_as_eof_gets_every_byte_across_a_demotion`
//! (accel_flow_control.rs).
use fastpath_tests::{
    accel::Accel,
    mesh::{Mesh, NetCounters, SidecarPolling},
    stress::Rng,
};
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

const SIZE: usize = 4 << 20;

fn echo_server(l: TcpListener) {
    for s in l.incoming() {
        let Ok(mut s) = s else { return };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        });
    }
}

/// A connection whose echo differed.
struct Failure {
    /// The client app's port, which finds the connection in the sidecars' logs.
    app_port: u16,
    text: String,
}

/// One connection; `Err` says how its echo differed.
fn one(addr: SocketAddr, seed: u64) -> Result<u16, Failure> {
    let mut r = Rng::new(seed);
    let data: Vec<u8> = (0..SIZE).map(|_| r.next_u64() as u8).collect();
    let c = TcpStream::connect(addr).map_err(|e| Failure {
        app_port: 0,
        text: format!("seed {seed}: connect: {e}"),
    })?;
    let app_port = c.local_addr().unwrap().port();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = c.try_clone().unwrap();
    let wdata = data.clone();
    let writer = std::thread::spawn(move || -> Result<(), String> {
        let mut r = Rng::new(seed ^ 0x5555);
        let mut off = 0;
        while off < SIZE {
            let n = (r.range(1, 256 * 1024) as usize).min(SIZE - off);
            w.write_all(&wdata[off..off + n])
                .map_err(|e| format!("write at {off}: {e}"))?;
            off += n;
        }
        w.shutdown(Shutdown::Write).map_err(|e| e.to_string())
    });
    let mut rd = c;
    let mut got = Vec::with_capacity(SIZE);
    let mut buf = vec![0u8; 128 * 1024];
    let err = loop {
        match rd.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A blocking read on a paired socket can be woken without data (kernel defect,
            // docs/accelerator.md); an event-driven client polls again.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => break Some(e.to_string()),
        }
    };
    let w = writer.join().unwrap();
    let bad = got.iter().zip(&data).position(|(a, b)| a != b);
    if got.len() != SIZE || bad.is_some() || err.is_some() || w.is_err() {
        return Err(Failure {
            app_port,
            text: format!(
                "seed {seed}: {} of {SIZE} bytes back, first bad offset {bad:?}, read error {err:?}, writer {w:?}",
                got.len()
            ),
        });
    }
    Ok(app_port)
}

/// Runs `rounds` rounds of 2 concurrent echoes; returns the failures.
fn run(mesh: &Mesh, rounds: u64, base: u64) -> Vec<Failure> {
    let addr = mesh.server_addr(7007);
    let mut failures = Vec::new();
    let mut traced = false;
    for round in 0..rounds {
        let res = mesh.client.run(|| {
            std::thread::scope(|s| {
                let h: Vec<_> = (0..2)
                    .map(|k| s.spawn(move || one(addr, base + round * 2 + k)))
                    .collect();
                h.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
            })
        });
        for r in res {
            match r {
                Ok(port) if !traced => {
                    // The sidecars' log, which tells their failures apart, finds an intact
                    // echo on both hops, closed normally, all 4 MiB each way.
                    let trace = mesh.trace(port);
                    let want = format!("up={SIZE} down={SIZE} --");
                    assert!(
                        [&trace.outbound, &trace.inbound]
                            .iter()
                            .all(|s| s.as_ref().is_some_and(|s| s.line.ends_with(&want))),
                        "{trace}"
                    );
                    traced = true;
                }
                Ok(_) => {}
                Err(f) => failures.push(f),
            }
        }
    }
    failures
}

/// Every connection's echo was intact. A failure is printed with both sidecars' log of it
/// (bytes each way and how each session ended) and the pods' reset and conntrack counters.
fn check_failures(mesh: &Mesh, failures: &[Failure], before: [NetCounters; 2], mode: &str) {
    let total = rounds() * 2;
    let after = [NetCounters::of(&mesh.client), NetCounters::of(&mesh.server)];
    let traced: Vec<String> = failures
        .iter()
        .map(|f| format!("{}; {}", f.text, mesh.trace(f.app_port)))
        .collect();
    assert!(
        failures.is_empty(),
        "{mode}: {} of {total} connections failed: {traced:?}; client pod {:?} -> {:?}, server \
         pod {:?} -> {:?}",
        failures.len(),
        before[0],
        after[0],
        before[1],
        after[1]
    );
}

fn mesh_with_echo(tag: &str, subnet: u8, accel: Option<&Accel>) -> Mesh {
    let polling = SidecarPolling::from_env("ECHO_SIDECAR_POLLING");
    let mesh = Mesh::with_polling(tag, subnet, accel, polling);
    let l = mesh
        .server
        .run(|| TcpListener::bind("0.0.0.0:7007").unwrap());
    std::thread::spawn(move || echo_server(l));
    mesh
}

/// Rounds (2 connections each): 200 by default, as the acceptance asks; ECHO_ROUNDS
/// changes it.
fn rounds() -> u64 {
    std::env::var("ECHO_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

#[test]
fn echo_through_sidecars_is_intact_accelerated() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    // ECHO_MAX_QUEUED_BYTES lowers the queue bound, so that connections are demoted part-way
    // (a measurement; the test runs with the default).
    let accel = Accel::start_configured("sidecarecho", |s| {
        if let Some(bound) = std::env::var("ECHO_MAX_QUEUED_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            s.max_queued_bytes = bound;
        }
    });
    let mesh = mesh_with_echo("fpse", 61, Some(&accel));
    let base = 1_000_000;
    let before = [NetCounters::of(&mesh.client), NetCounters::of(&mesh.server)];
    let failures = run(&mesh, rounds(), base);
    let client = accel.stats(mesh.client.cookie());
    let server = accel.stats(mesh.server.cookie());
    eprintln!(
        "accelerated: {} demotions by the bound in the client pod, {} in the server pod",
        client.queue_demotions, server.queue_demotions
    );
    check_failures(&mesh, &failures, before, "accelerated");
    // Every hop of every connection was paired, and the echo went socket to socket until a
    // reader lagged past the queue bound: at least 1/32 of the bytes of both of the client
    // pod's hops (measured: 1/21). The bound is the reader's backlog room, and the app's
    // sidecar, sized for the app's 1448-byte MSS, has about 170 KiB of it; the app's 4 MiB
    // arrive in writes of up to 256 KiB, so most connections leave the fast path early.
    assert!(client.connections_paired >= rounds() * 2, "{client:?}");
    assert!(server.connections_paired >= rounds() * 4, "{server:?}");
    assert!(
        client.bytes_redirected >= rounds() * 2 * SIZE as u64 / 32,
        "{client:?}"
    );
}

#[test]
fn echo_through_sidecars_is_intact_plain() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let mesh = mesh_with_echo("fpsp", 63, None);
    let before = [NetCounters::of(&mesh.client), NetCounters::of(&mesh.server)];
    let failures = run(&mesh, rounds(), 2_000_000);
    check_failures(&mesh, &failures, before, "plain");
}
