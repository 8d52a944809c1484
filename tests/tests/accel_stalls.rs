//! No stalls: epoll servers (nginx) sending large responses to paired clients, and an nginx
//! reverse proxy in a mesh pod whose upstream is off the mesh (not accelerated). On this
//! kernel a socket left in the sockhash without a peer reads FIONREAD = 0 and nginx hangs on
//! it; the accelerator must never leave one there.
use fastpath_common::map_names;
use fastpath_tests::accel::{Accel, Pod, link_pods};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// An nginx in a pod, killed on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    fn start(pod: &Pod, dir: &Path, server_block: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;\n\
                 error_log {d}/error.log warn;\n\
                 events {{ worker_connections 256; use epoll; }}\n\
                 http {{ access_log off; client_body_temp_path {d}/body; \
                 proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi; \
                 uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n{server_block}\n}}\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &pod.ns.name, "nginx", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_port(pod: &Pod, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let ok = pod.run(|| std::net::TcpStream::connect(addr).is_ok());
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {addr}");
}

/// Downloads `urls` over one keep-alive connection with curl in `pod`; returns the sizes.
fn curl(pod: &Pod, urls: &[String]) -> Vec<u64> {
    let mut args = vec![
        "curl".to_string(),
        "-s".into(),
        "--max-time".into(),
        "60".into(),
    ];
    for u in urls {
        args.extend([
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{size_download}\\n".into(),
            u.clone(),
        ]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = pod.ns.exec(&argv).unwrap();
    assert!(
        out.status.success(),
        "curl failed (a stall ends in the timeout): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

fn big_files(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, mib) in [("10m", 10usize), ("30m", 30)] {
        let data = fastpath_tests::accel::pattern(mib as u64, mib << 20);
        std::fs::write(dir.join(name), data).unwrap();
    }
}

#[test]
fn nginx_proxy_with_unaccelerated_upstream_and_direct_large_responses_never_stall() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    // The queue bound out of the way (1 GiB): this test is about paired sockets under epoll
    // servers writing large responses, which a 2 MiB bound would demote to TCP part-way (see
    // the demoted-nginx test below and accel_flow_control).
    let accel = Accel::start_configured("stalls", |s| s.max_queued_bytes = 1 << 30);
    let mut mesh = Pod::new("fpngm");
    let mut off = Pod::new("fpngo");
    link_pods(&mut mesh, &mut off, 3);
    accel.enroll(&mesh, None);

    let www = accel.run_dir.join("www");
    big_files(&www);
    let _upstream = Nginx::start(
        &off,
        &accel.run_dir.join("ngx-upstream"),
        &format!(
            "server {{ listen 10.247.3.2:8081; root {}; }}",
            www.display()
        ),
    );
    let _proxy = Nginx::start(
        &mesh,
        &accel.run_dir.join("ngx-proxy"),
        &format!(
            "upstream up {{ server 10.247.3.2:8081; keepalive 4; }}\n\
             server {{ listen 127.0.0.1:8080; location / {{ proxy_pass http://up; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n\
             server {{ listen 127.0.0.1:8082; root {}; }}",
            www.display()
        ),
    );
    wait_port(&off, "10.247.3.2:8081");
    wait_port(&mesh, "127.0.0.1:8080");
    wait_port(&mesh, "127.0.0.1:8082");

    // 20 proxied requests alternating 10 MiB / 30 MiB over keep-alive connections.
    let urls: Vec<String> = (0..20)
        .map(|i| {
            let f = if i % 2 == 0 { "10m" } else { "30m" };
            format!("http://127.0.0.1:8080/{f}")
        })
        .collect();
    for chunk in urls.chunks(5) {
        let sizes = curl(&mesh, chunk);
        for (u, got) in chunk.iter().zip(sizes) {
            let want = if u.ends_with("10m") {
                10 << 20
            } else {
                30 << 20
            };
            assert_eq!(got, want, "{u}");
        }
    }
    // nginx's upstream sockets never entered the sockhash: only client<->proxy pairs did.
    let st = accel.stats(mesh.cookie());
    assert!(st.connections_paired >= 4, "client<->proxy paired: {st:?}");

    // Direct: an epoll server writing large responses into paired sockets.
    let urls: Vec<String> = (0..10)
        .map(|i| {
            let f = if i % 2 == 0 { "30m" } else { "10m" };
            format!("http://127.0.0.1:8082/{f}")
        })
        .collect();
    let before = accel.stats(mesh.cookie());
    let sizes = curl(&mesh, &urls);
    assert_eq!(sizes.len(), 10);
    for (u, got) in urls.iter().zip(sizes) {
        let want = if u.ends_with("10m") {
            10 << 20
        } else {
            30 << 20
        };
        assert_eq!(got, want, "{u}");
    }
    let after = accel.stats(mesh.cookie());
    assert!(
        after.bytes_redirected - before.bytes_redirected >= 200 << 20,
        "large responses were redirected: {before:?} -> {after:?}"
    );
    drop(_proxy);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(accel.map_entries(map_names::SOCKS), 0);
}

/// Demotion under nginx: a local origin writes large responses into nginx's upstream socket
/// faster than the proxy passes them on (unbuffered, to a rate-limited client), so the
/// upstream connection (and the client's) pass the queue limit and go back to TCP mid-stream.
/// nginx (epoll, edge-triggered, EPOLLRDHUP) must read the rest from TCP without stalling.
#[test]
fn nginx_reading_a_connection_demoted_mid_stream_never_stalls() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start_configured("demoted", |s| s.max_queued_bytes = 1 << 20);
    let mesh = Pod::new("fpngd");
    accel.enroll(&mesh, None);
    let www = accel.run_dir.join("www");
    big_files(&www);
    let _origin = Nginx::start(
        &mesh,
        &accel.run_dir.join("ngx-origin"),
        &format!(
            "server {{ listen 127.0.0.1:8091; root {}; }}",
            www.display()
        ),
    );
    let _proxy = Nginx::start(
        &mesh,
        &accel.run_dir.join("ngx-proxy"),
        "upstream origin { server 127.0.0.1:8091; keepalive 4; }\n\
         server { listen 127.0.0.1:8090; location / { proxy_pass http://origin; \
         proxy_buffering off; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }",
    );
    wait_port(&mesh, "127.0.0.1:8091");
    wait_port(&mesh, "127.0.0.1:8090");
    for round in 0..3 {
        let out = mesh
            .ns
            .exec(&[
                "curl",
                "-s",
                "--max-time",
                "60",
                "--limit-rate",
                "40M",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
                "http://127.0.0.1:8090/30m",
            ])
            .unwrap();
        assert!(
            out.status.success(),
            "round {round}: curl failed (a stall ends in the timeout): {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "31457280");
    }
    let st = accel.stats(mesh.cookie());
    eprintln!("nginx through demotions: {st:?}");
    assert!(st.queue_demotions >= 1, "no connection was demoted: {st:?}");
}
