//! install-cni: reads the configuration, then runs the agent or a one-shot command.
use fastpath_installer::config::{Command, Config, RawConfig, usage};
use fastpath_installer::{accel, agent, install, logging, uninstall};

fn main() {
    std::process::exit(run());
}

fn run() -> i32 {
    let built = (|| -> anyhow::Result<_> {
        let raw = RawConfig::read(std::env::args().skip(1), |k| std::env::var(k).ok())?;
        let cfg = Config::build(&raw, |p| std::fs::read_to_string(p))?;
        // Rendered here too, so a bad template stops start-up with one message.
        let entry = install::plugin_entry(&cfg)?;
        if raw.command == Command::Run {
            cfg.check_for_run(&raw)?;
        }
        Ok((raw.command, cfg, entry))
    })();
    let (command, cfg, entry) = match built {
        Ok(b) => b,
        Err(e) => {
            eprintln!("install-cni: {e}");
            return 2;
        }
    };
    logging::init(cfg.log.clone());
    match command {
        Command::Run => agent::run(cfg, entry),
        Command::Help => {
            print!("{}", usage());
            0
        }
        Command::Version => {
            println!("install-cni (fastpath) {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Command::AccelStatus => match accel::status_report(&cfg.accel) {
            Ok(s) => {
                println!("{s}");
                0
            }
            Err(e) => {
                eprintln!("install-cni accel-status: {e:#}");
                1
            }
        },
        Command::Uninstall => uninstall::node(&cfg, None),
        Command::UninstallAndWait => match uninstall::node(&cfg, None) {
            // Exit on failure, so that the container is restarted and tries again.
            0 => wait_for_termination(),
            code => code,
        },
    }
}

/// Blocks until SIGTERM or SIGINT; 0.
fn wait_for_termination() -> i32 {
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(mut signals) => {
            let _ = signals.forever().next();
            0
        }
        Err(e) => {
            eprintln!("install-cni: cannot wait for SIGTERM: {e}");
            1
        }
    }
}
