//! `istio-cni`: wires the process (env, stdin, stdout, stderr, own netns) to the plugin.
use fastpath_cni_plugin::{ABOUT, arena::Arena, iptables::NetnsEntry, plugin::IstioCni, skel};

/// Small blocks from a bump arena (see `arena`): the invocation is short-lived.
#[global_allocator]
static ALLOC: Arena = Arena::new();

/// A panic must still leave a CNI error on stdout (the release profile aborts on panic, so this
/// is the last word; Istio's plugin recovers panics into errors too).
fn report_panics() {
    std::panic::set_hook(Box::new(|info| {
        let err = skel::CniError::internal(format!("istio-cni panicked: {info}"));
        let mut line = err.to_json("1.1.0").to_string();
        line.push('\n');
        use std::io::Write as _;
        let _ = std::io::stdout().write_all(line.as_bytes());
        let _ = std::io::stdout().flush();
        eprintln!("istio-cni panicked: {info}");
        std::process::exit(1);
    }));
}

fn main() {
    report_panics();
    // One invocation, one thread: it may step into the pod's netns itself.
    let mut plugin = IstioCni::default();
    plugin.netns_entry = NetnsEntry::CallingThread;
    let getenv = |k: &str| std::env::var(k).ok();
    let own_netns = skel::probe_netns("/proc/self/ns/net").ok();
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let code = skel::dispatch(
        skel::Io {
            getenv: &getenv,
            stdin: &mut stdin,
            stdout: &mut stdout,
            stderr: &mut stderr,
            own_netns,
            probe_netns: &skel::probe_netns,
        },
        &plugin,
        ABOUT,
    );
    let socket = plugin.log_socket.borrow().clone();
    plugin
        .log
        .borrow_mut()
        .flush(socket.as_deref().map(std::path::Path::new), &mut stderr);
    std::process::exit(code);
}
