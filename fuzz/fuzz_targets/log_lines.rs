//! A POST /log body on the agent's log socket, and the text line written for each entry: one
//! line per entry, whatever the entry holds.
#![no_main]
use fastpath_installer::{logging, logsock};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((lines, _)) = logsock::parse_body(data) else {
        return;
    };
    for l in lines {
        let text = logging::format_line(false, l.level, &l.time, "cni-plugin", &l.msg, &l.fields);
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
    }
});
