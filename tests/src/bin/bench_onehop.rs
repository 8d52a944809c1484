//! One-hop loopback benchmark (root): plain TCP vs TCP paired by the accelerator vs a unix
//! socket pair; ping-pong round trips (p50/p99) for several message sizes and a 64 KiB-write
//! stream, with both ends on the same CPU and on different CPUs. Modes are interleaved and
//! their order rotates every repetition; the reported figure is the median over repetitions.
//!
//! Loads a private accelerator (pins under /sys/fs/bpf/fastpath-bench-<pid>, removed at exit);
//! "plain" runs in a network namespace that is not enrolled, "accel" in one that is. Then the
//! same hop in mesh pods (Istio's iptables rules loaded, so netfilter and conntrack see every
//! plain packet on loopback, as in a sidecar pod). Last, "bystander" compares plain ping-pong
//! with the programs attached and detached.
//!
//! Usage: bench_onehop [--reps N] [--rtts N] [--stream-mib N] [--only SECTION]
//! SECTION is pingpong, mesh, stream or bystander (all when absent; a partial run is for
//! quick comparisons, `scripts/bench.sh` runs them all). JSON summary on stdout, a table on
//! stderr.
use fastpath_installer::accel::{self, AccelSettings, AccelState};
use serde_json::json;
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Instant,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Plain,
    Accel,
    Uds,
}

const MODES: [Mode; 3] = [Mode::Plain, Mode::Accel, Mode::Uds];
const SIZES: [usize; 5] = [1, 64, 1024, 16384, 65536];

#[derive(Clone, Copy)]
enum Placement {
    SameCpu,
    CrossCpu,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::SameCpu => "same",
            Placement::CrossCpu => "cross",
        }
    }
    /// (server cpu, client cpu)
    fn cpus(self) -> (usize, usize) {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        match self {
            Placement::SameCpu => (n - 1, n - 1),
            Placement::CrossCpu => (0, n.min(2) - 1),
        }
    }
}

fn pin_cpu(cpu: usize) {
    // SAFETY: sched_setaffinity on the calling thread with a set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::sched_getcpu() as usize, cpu, "running on CPU {cpu}");
    }
}

/// Reads exactly, retrying EAGAIN (6.18 tcp_bpf can return it on a wakeup without data).
fn read_full(s: &mut impl Read, buf: &mut [u8]) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        match s.read(&mut buf[off..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => off += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

trait Conn: Read + Write + Send + 'static {}
impl Conn for TcpStream {}
impl Conn for UnixStream {}

struct Bench {
    plain_ns: String,
    accel_ns: String,
}

impl Bench {
    /// A connected (client, server) pair for `mode`.
    fn pair(&self, mode: Mode) -> (Box<dyn Conn>, Box<dyn Conn>) {
        let tcp = |ns: &str| {
            in_netns(ns, || {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let (s, _) = l.accept().unwrap();
                c.set_nodelay(true).unwrap();
                s.set_nodelay(true).unwrap();
                (c, s)
            })
        };
        match mode {
            Mode::Plain => {
                let (c, s) = tcp(&self.plain_ns);
                (Box::new(c), Box::new(s))
            }
            Mode::Accel => {
                let (c, s) = tcp(&self.accel_ns);
                (Box::new(c), Box::new(s))
            }
            Mode::Uds => {
                let (c, s) = UnixStream::pair().unwrap();
                (Box::new(c), Box::new(s))
            }
        }
    }

    /// Round-trip times in µs of `n` ping-pongs of `size` bytes (after a warm-up).
    fn ping_pong(&self, mode: Mode, place: Placement, size: usize, n: usize) -> Vec<f64> {
        let (mut c, mut s) = self.pair(mode);
        let (scpu, ccpu) = place.cpus();
        let warm = n / 10 + 100;
        let server = std::thread::spawn(move || {
            pin_cpu(scpu);
            let mut buf = vec![0u8; size];
            for _ in 0..warm + n {
                read_full(&mut s, &mut buf).unwrap();
                s.write_all(&buf).unwrap();
            }
        });
        pin_cpu(ccpu);
        let msg = vec![7u8; size];
        let mut buf = vec![0u8; size];
        let mut rtts = Vec::with_capacity(n);
        for i in 0..warm + n {
            let t = Instant::now();
            c.write_all(&msg).unwrap();
            read_full(&mut c, &mut buf).unwrap();
            if i >= warm {
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        server.join().unwrap();
        rtts
    }

    /// GiB/s of a one-way stream of 64 KiB writes.
    fn stream(&self, mode: Mode, place: Placement, mib: usize) -> f64 {
        let (mut c, mut s) = self.pair(mode);
        let (scpu, ccpu) = place.cpus();
        let total = mib << 20;
        let server = std::thread::spawn(move || {
            pin_cpu(scpu);
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0;
            while got < total {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            got
        });
        pin_cpu(ccpu);
        let chunk = vec![1u8; 64 * 1024];
        let t = Instant::now();
        for _ in 0..total / chunk.len() {
            c.write_all(&chunk).unwrap();
        }
        let got = server.join().unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(got, total);
        total as f64 / secs / (1u64 << 30) as f64
    }
}

fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let ns = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd as _;
            // SAFETY: setns on this thread only.
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            f()
        })
        .join()
        .unwrap()
    })
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    percentile(&mut v, 0.5)
}

fn arg_text(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn arg(name: &str, default: usize) -> usize {
    arg_text(name)
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// Network namespaces and the private accelerator, removed on drop.
struct Setup {
    settings: AccelSettings,
    namespaces: Vec<String>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Err(e) = accel::uninstall(&self.settings) {
            eprintln!("uninstall: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&self.settings.run_dir);
        for ns in &self.namespaces {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

fn main() {
    let reps = arg("--reps", 5);
    let rtts = arg("--rtts", 20000);
    let stream_mib = arg("--stream-mib", 1024);
    let only = arg_text("--only");
    let section = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let pid = std::process::id();
    let run_dir = std::env::temp_dir().join(format!("fp-bench-{pid}"));
    let setup = Setup {
        settings: AccelSettings {
            enabled: true,
            bpffs: PathBuf::from("/sys/fs/bpf"),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/fastpath-bench-{pid}")),
            cgroup_root: fastpath_installer::accel::CgroupRoot::FromOwnMounts,
            run_dir: run_dir.clone(),
            max_queued_bytes: fastpath_common::DEFAULT_QUEUE_LIMIT_BYTES,
            drain_timeout: fastpath_installer::accel::drain::DRAIN_TIMEOUT,
            features_off: Default::default(),
        },
        namespaces: vec![
            format!("fpbplain{pid}"),
            format!("fpbaccel{pid}"),
            format!("fpbplainipt{pid}"),
            format!("fpbaccelipt{pid}"),
        ],
    };
    // Release builds abort on panic, so Drop would not run: clean up from the hook.
    let cleanup = (setup.settings.clone(), setup.namespaces.clone());
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("bench_onehop: {info}");
        let _ = accel::uninstall(&cleanup.0);
        let _ = std::fs::remove_dir_all(&cleanup.0.run_dir);
        for ns in &cleanup.1 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }));
    for ns in &setup.namespaces {
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ip netns add {ns} && ip -n {ns} link set lo up"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "create netns {ns}");
    }
    // The last two are mesh pods: Istio's rules (the plugin's golden text) are loaded, so
    // netfilter and conntrack see every packet on their loopback, as in a real sidecar pod.
    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/istio/basic.txt.golden"
    );
    for ns in &setup.namespaces[2..] {
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip netns exec {ns} iptables-restore --noflush < {rules}"
            ))
            .status()
            .unwrap()
            .success();
        assert!(ok, "load Istio's rules in {ns}");
    }
    let state = accel::start(&setup.settings);
    assert_eq!(state, AccelState::Active, "the accelerator must load");
    // The accelerated namespaces (bare, and with Istio's rules) are enrolled as pods.
    for ns in [&setup.namespaces[1], &setup.namespaces[3]] {
        let netns_path = format!("/var/run/netns/{ns}");
        let enrollment = fastpath_cni_plugin::accel::PodEnrollment {
            netns_path: &netns_path,
            namespace: "bench",
            name: ns,
            container_id: ns,
            run_dir: run_dir.to_str().unwrap(),
            ..Default::default()
        };
        fastpath_cni_plugin::accel::enroll_at(&enrollment, &setup.settings.pin_dir).unwrap();
    }
    let bench = Bench {
        plain_ns: setup.namespaces[0].clone(),
        accel_ns: setup.namespaces[1].clone(),
    };
    let bench_ipt = Bench {
        plain_ns: setup.namespaces[2].clone(),
        accel_ns: setup.namespaces[3].clone(),
    };

    let mut pingpong = Vec::new();
    let mut table = String::new();
    for place in [Placement::SameCpu, Placement::CrossCpu]
        .into_iter()
        .filter(|_| section("pingpong"))
    {
        for size in SIZES {
            let mut p50 = [vec![], vec![], vec![]];
            let mut p99 = [vec![], vec![], vec![]];
            for rep in 0..reps {
                for k in 0..3 {
                    let mode = MODES[(k + rep) % 3];
                    let idx = MODES.iter().position(|m| *m == mode).unwrap();
                    let mut v = bench.ping_pong(mode, place, size, rtts);
                    p50[idx].push(percentile(&mut v, 0.5));
                    p99[idx].push(percentile(&mut v, 0.99));
                }
            }
            let m50: Vec<f64> = p50.into_iter().map(median).collect();
            let m99: Vec<f64> = p99.into_iter().map(median).collect();
            let ratio = m50[0] / m50[1];
            table += &format!(
                "ping-pong {:5} {:6} B | plain {:7.2} / {:7.2} | accel {:7.2} / {:7.2} | uds {:7.2} / {:7.2} | plain/accel p50 {:.2}x\n",
                place.name(),
                size,
                m50[0],
                m99[0],
                m50[1],
                m99[1],
                m50[2],
                m99[2],
                ratio
            );
            let entry = |i: usize| json!({"p50_us": m50[i], "p99_us": m99[i]});
            pingpong.push(json!({
                "cpu": place.name(), "size": size,
                "plain": entry(0), "accel": entry(1), "uds": entry(2),
                "plain_over_accel_p50": ratio,
                "accel_over_uds_p50": m50[1] / m50[2],
            }));
        }
    }
    // The same hop inside a mesh pod (Istio's rules loaded): plain vs accelerated.
    let mut pingpong_ipt = Vec::new();
    for place in [Placement::SameCpu, Placement::CrossCpu]
        .into_iter()
        .filter(|_| section("mesh"))
    {
        for size in [64, 1024] {
            let mut p50 = [vec![], vec![]];
            for rep in 0..reps {
                for k in 0..2 {
                    let idx = (k + rep) % 2;
                    let mode = [Mode::Plain, Mode::Accel][idx];
                    let mut v = bench_ipt.ping_pong(mode, place, size, rtts);
                    p50[idx].push(percentile(&mut v, 0.5));
                }
            }
            let [plain, accel] = p50.map(median);
            table += &format!(
                "ping-pong in a mesh pod {:5} {:6} B | plain {plain:7.2} | accel {accel:7.2} | plain/accel p50 {:.2}x\n",
                place.name(),
                size,
                plain / accel
            );
            pingpong_ipt.push(json!({
                "cpu": place.name(), "size": size,
                "plain_p50_us": plain, "accel_p50_us": accel,
                "plain_over_accel_p50": plain / accel,
            }));
        }
    }
    let mut streams = Vec::new();
    for place in [Placement::SameCpu, Placement::CrossCpu]
        .into_iter()
        .filter(|_| section("stream"))
    {
        let mut gib = [vec![], vec![], vec![]];
        for rep in 0..reps {
            for k in 0..3 {
                let mode = MODES[(k + rep) % 3];
                let idx = MODES.iter().position(|m| *m == mode).unwrap();
                gib[idx].push(bench.stream(mode, place, stream_mib));
            }
        }
        let m: Vec<f64> = gib.into_iter().map(median).collect();
        table += &format!(
            "stream 64 KiB {:5} | plain {:.2} GiB/s | accel {:.2} GiB/s | uds {:.2} GiB/s | accel/plain {:.2}x\n",
            place.name(),
            m[0],
            m[1],
            m[2],
            m[1] / m[0]
        );
        streams.push(json!({
            "cpu": place.name(), "write_size": 65536,
            "plain_gib_s": m[0], "accel_gib_s": m[1], "uds_gib_s": m[2],
            "accel_over_plain": m[1] / m[0],
        }));
    }
    // What a connection the accelerator does not take over pays for its programs being
    // attached (sock_ops at set-up, the recvmsg tracepoint on every read): plain 64 B
    // ping-pong on one CPU, with the programs attached and detached, interleaved.
    let mut bystander = serde_json::Value::Null;
    if section("bystander") {
        let mut on_off = [vec![], vec![]];
        for rep in 0..reps {
            for k in 0..2 {
                let attached = (k + rep) % 2 == 0;
                if attached {
                    assert_eq!(accel::start(&setup.settings), AccelState::Active);
                } else {
                    accel::uninstall(&setup.settings).unwrap();
                }
                let mut v = bench.ping_pong(Mode::Plain, Placement::SameCpu, 64, rtts);
                on_off[usize::from(!attached)].push(percentile(&mut v, 0.5));
            }
        }
        let [on, off] = on_off.map(median);
        table += &format!(
            "bystander (plain, same CPU, 64 B) | programs attached {on:.2} µs | detached {off:.2} µs | {:.3}x\n",
            on / off
        );
        bystander = json!({
            "attached_p50_us": on, "detached_p50_us": off, "attached_over_detached": on / off,
        });
    }
    eprintln!(
        "p50 / p99 round trip in µs, median of {reps} interleaved runs of {rtts} round trips\n{table}"
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "reps": reps, "round_trips": rtts, "stream_mib": stream_mib,
            "pingpong": pingpong, "pingpong_in_mesh_pod": pingpong_ipt,
            "stream": streams, "bystander": bystander,
        }))
        .unwrap()
    );
    drop(setup);
}
