//! The plugin's per-pod state files (`<run_dir>/fastpath/pods/<container-id>.json`): who an
//! enrolled netns cookie is (for counter labels), and what to re-enroll when the enrollment
//! maps had to be recreated by an upgrade. Owned by fastpath-pins.
pub use fastpath_pins::record::{PodRecord, ip_key, read_all, state_dir};
