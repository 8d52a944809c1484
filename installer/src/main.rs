fn main() {
    env_logger::init();
    log::info!(
        "install-cni (fastpath): probes embedded: {}",
        fastpath_installer::probes::embedded()
    );
}
