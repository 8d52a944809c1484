//! The toolchain end to end: the object the installer embeds was built from `probes/`, carries
//! the programs of the expected types, and passes the kernel's verifier.
use aya::{
    EbpfLoader,
    programs::{Program, ProgramType},
};
use fastpath_common::prog_names;
use fastpath_installer::probes;

#[test]
fn probes_load_and_pass_the_verifier() {
    assert!(
        probes::embedded(),
        "the installer was built without its probes (AYA_BUILD_SKIP?)"
    );
    if !fastpath_tests::require_privileges!() {
        return;
    }
    fastpath_tests::ensure_bpffs();
    // Maps are declared pinned: pin them in a private directory, removed at the end.
    let pin_dir = fastpath_tests::ScratchBpffsDir::new("smoke");
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir.path())
        .load(probes::OBJECT)
        .expect("aya parses the embedded object and creates its maps");

    let types: Vec<(String, ProgramType)> = ebpf
        .programs()
        .map(|(n, p)| (n.to_string(), p.prog_type()))
        .collect();
    assert!(
        types.contains(&(prog_names::SOCK_OPS.into(), ProgramType::SockOps)),
        "{types:?}"
    );
    assert!(
        types.contains(&(prog_names::SK_MSG.into(), ProgramType::SkMsg)),
        "{types:?}"
    );
    assert!(
        types.contains(&(prog_names::RX_CONSUMED.into(), ProgramType::RawTracePoint)),
        "{types:?}"
    );
    assert!(
        types.contains(&(prog_names::INGRESS_GATE.into(), ProgramType::CgroupSkb)),
        "{types:?}"
    );

    for (name, prog) in ebpf.programs_mut() {
        let loaded = match prog {
            Program::SockOps(p) => p.load(),
            Program::SkMsg(p) => p.load(),
            Program::RawTracePoint(p) => p.load(),
            Program::CgroupSkb(p) => p.load(),
            other => panic!("unexpected program {name}: {:?}", other.prog_type()),
        };
        loaded.unwrap_or_else(|e| panic!("{name} must pass the verifier: {e:#?}"));
    }
}
