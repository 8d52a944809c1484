//! `cnirun ADD|CHECK|DEL <conflist> <container-id> <netns> [--args K=V;..] [--ifname eth0]`
//! A minimal cnitool: drives a conflist's plugins as a container runtime does. Used by the demo
//! and the bench. Env: CNI_PATH (colon-separated), CNI_CACHE_DIR (default /var/lib/cni).
use anyhow::{Context as _, Result, bail};
use fastpath_tests::cni::{Attachment, Runtime, load_conflist};
use std::path::PathBuf;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(cmd), Some(conf), Some(cid), Some(netns)) =
        (args.next(), args.next(), args.next(), args.next())
    else {
        bail!(
            "usage: cnirun ADD|CHECK|DEL <conflist> <container-id> <netns> [--args K=V;..] [--ifname IF]"
        );
    };
    let mut att = Attachment {
        container_id: cid,
        netns,
        ifname: "eth0".into(),
        args: String::new(),
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--args" => att.args = args.next().context("--args needs a value")?,
            "--ifname" => att.ifname = args.next().context("--ifname needs a value")?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let rt = Runtime {
        cni_path: std::env::split_paths(
            &std::env::var("CNI_PATH").unwrap_or_else(|_| "/opt/cni/bin".into()),
        )
        .collect(),
        cache_dir: PathBuf::from(
            std::env::var("CNI_CACHE_DIR").unwrap_or_else(|_| "/var/lib/cni".into()),
        ),
        env: vec![],
    };
    let list = load_conflist(&PathBuf::from(conf))?;
    match cmd.as_str() {
        "ADD" => {
            let (result, _) = rt.add(&list, &att)?;
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        "CHECK" => {
            rt.check(&list, &att)?;
        }
        "DEL" => {
            rt.del(&list, &att)?;
        }
        other => bail!("unknown command {other:?}"),
    }
    Ok(())
}
