//! The one owner of fastpath's pinned accelerator state in userspace: the plugin, the agent
//! and the tests open the maps pinned under the pin directory through [`Pins`], enroll and
//! unenroll pods through it, and read the pod records with [`record`]. The layouts are
//! fastpath-common's (shared with the probes); the bpf(2) commands are [`sys`]'s.
//!
//! The map logic runs on a [`sys::Sys`]: the kernel in the binaries, an in-memory fake in unit
//! tests (`fake`, feature `fake`), so enrollment, the ABI stamp check and the counters are
//! tested without root.
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod map;
pub mod record;
pub mod sys;

pub use map::{Map, PerCpuMap, Plain, TypedMap};
pub use record::{PodRecord, RecordError, ip_key};
pub use sys::{Cmd, Kernel, MapInfo, current_netns_cookie};

use fastpath_common::{IpKey, MAP_ABI_VERSION, PodInfo, PodStats, RxQueue, map_names, meta_index};
use std::{
    io,
    path::{Path, PathBuf},
};
use sys::{MapOps, Sys};

/// A failed operation on a pinned object; the message names the command and the pin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bpf({cmd}) on {}: {error}", path.display())]
    Bpf {
        cmd: Cmd,
        path: PathBuf,
        error: io::Error,
    },
    /// A step of an enrollment, named as the operator reads it (`register 10.1.2.3`).
    #[error("{what}: {error}")]
    Step { what: String, error: Box<Error> },
    #[error("the number of possible CPUs: {0}")]
    Cpus(io::Error),
}

impl Error {
    /// The system's error beneath.
    pub fn os_error(&self) -> &io::Error {
        match self {
            Error::Bpf { error, .. } | Error::Cpus(error) => error,
            Error::Step { error, .. } => error.os_error(),
        }
    }

    /// Whether the pin (or the entry) does not exist.
    pub fn is_not_found(&self) -> bool {
        self.os_error().kind() == io::ErrorKind::NotFound
    }

    fn step(what: impl Into<String>) -> impl FnOnce(Error) -> Error {
        move |error| Error::Step {
            what: what.into(),
            error: Box::new(error),
        }
    }
}

/// Why the plugin leaves the pinned maps alone: their map ABI stamp (FP_META) is not this
/// build's. A plugin binary and an agent of different builds meet during an upgrade; writing
/// another build's maps could put entries where their programs read something else.
#[derive(Debug, thiserror::Error)]
pub enum StampError {
    #[error("cannot open the accelerator's stamp (FP_META): {}", .0.os_error())]
    Open(Error),
    #[error("cannot read the accelerator's stamp: {0}")]
    Read(Error),
    #[error("the accelerator's maps carry no map ABI stamp yet")]
    Missing,
    #[error("the accelerator's maps have map ABI {0}, this plugin writes {MAP_ABI_VERSION}")]
    OtherAbi(u64),
}

/// The verdict on a stamp read from FP_META.
pub fn abi_verdict(stamp: Option<u64>) -> Result<(), StampError> {
    match stamp {
        Some(v) if v == MAP_ABI_VERSION as u64 => Ok(()),
        Some(0) | None => Err(StampError::Missing),
        Some(v) => Err(StampError::OtherAbi(v)),
    }
}

/// What [`Pins::enroll_pod`] did.
#[derive(Debug)]
pub enum Enrollment {
    Enrolled,
    /// Nothing is pinned (FP_PODS cannot be opened): the agent enrolls the pod from its record
    /// when it loads.
    NotLoaded(Error),
    /// The pins are another build's ([`StampError`]); the agent of this build enrolls the pod
    /// from its record when it loads.
    OtherAbi(StampError),
}

/// The accelerator's pins under one pin directory. Opening it touches nothing; each accessor
/// opens its map (`BPF_OBJ_GET`).
#[derive(Clone, Debug)]
pub struct Pins<S: Sys = Kernel> {
    dir: PathBuf,
    sys: S,
}

impl Pins<Kernel> {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self::with_sys(dir, Kernel)
    }
}

type Typed<S, K, V> = TypedMap<K, V, <S as Sys>::Map>;

impl<S: Sys> Pins<S> {
    pub fn with_sys(dir: impl Into<PathBuf>, sys: S) -> Self {
        Self {
            dir: dir.into(),
            sys,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `name` is pinned.
    pub fn pin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The map pinned as `name`.
    pub fn map(&self, name: &str) -> Result<Map<S::Map>, Error> {
        let path = self.pin(name);
        match self.sys.obj_get(&path) {
            Ok(handle) => Ok(Map::new(path, handle)),
            Err(error) => Err(Error::Bpf {
                cmd: Cmd::ObjGet,
                path,
                error,
            }),
        }
    }

    fn typed<K: Plain, V: Plain>(&self, name: &str) -> Result<Typed<S, K, V>, Error> {
        Ok(self.map(name)?.typed())
    }

    /// Runtime switches, by [`fastpath_common::config_index`].
    pub fn config(&self) -> Result<Typed<S, u32, u32>, Error> {
        self.typed(map_names::CONFIG)
    }

    /// The ABI stamp, by [`meta_index`].
    pub fn meta(&self) -> Result<Typed<S, u32, u64>, Error> {
        self.typed(map_names::META)
    }

    /// Enrolled pods: netns cookie -> opt-outs.
    pub fn pods(&self) -> Result<Typed<S, u64, PodInfo>, Error> {
        self.typed(map_names::PODS)
    }

    /// Pod IPs on this node -> netns cookie.
    pub fn pod_ips(&self) -> Result<Typed<S, IpKey, u64>, Error> {
        self.typed(map_names::POD_IPS)
    }

    /// Per-pod counters, one per CPU.
    pub fn stats(&self) -> Result<PerCpuMap<u64, PodStats, S::Map>, Error> {
        let cpus = self.sys.possible_cpus().map_err(Error::Cpus)?;
        Ok(PerCpuMap::new(self.map(map_names::STATS)?, cpus))
    }

    /// The sockhash: socket cookie -> socket (an fd, as `u32`, to insert one).
    pub fn socks(&self) -> Result<Typed<S, u64, u32>, Error> {
        self.typed(map_names::SOCKS)
    }

    /// Redirect queues: socket cookie -> receive side.
    pub fn rxq(&self) -> Result<Typed<S, u64, RxQueue>, Error> {
        self.typed(map_names::RXQ)
    }

    /// Demoted sockets still in the sockhash (the sweep list): socket cookie -> 0.
    pub fn demoted(&self) -> Result<Typed<S, u64, u64>, Error> {
        self.typed(map_names::DEMOTED)
    }

    /// Paired sockets by kernel address -> socket cookie.
    pub fn sk_cookies(&self) -> Result<Typed<S, u64, u64>, Error> {
        self.typed(map_names::SK_COOKIES)
    }

    /// Paired sockets counted in the read filter, by kernel address.
    pub fn sk_counted(&self) -> Result<Typed<S, u64, u64>, Error> {
        self.typed(map_names::SK_COUNTED)
    }

    /// The read filter: slot -> paired sockets in it.
    pub fn sk_filter(&self) -> Result<Typed<S, u32, u64>, Error> {
        self.typed(map_names::SK_FILTER)
    }

    /// The stamp as (map ABI, object hash); `None` when unstamped or not readable.
    pub fn stamp(&self) -> Option<(u64, u64)> {
        let meta = self.meta().ok()?;
        let abi = meta.get(&meta_index::ABI_VERSION).ok()??;
        let hash = meta.get(&meta_index::OBJECT_HASH).ok()??;
        (abi != 0).then_some((abi, hash))
    }

    /// Stamps the pins with this build's map ABI and the object hash of its probes.
    pub fn write_stamp(&self, object_hash: u64) -> Result<(), Error> {
        let meta = self.meta()?;
        meta.set(&meta_index::ABI_VERSION, &(MAP_ABI_VERSION as u64))?;
        meta.set(&meta_index::OBJECT_HASH, &object_hash)
    }

    /// Whether the pinned maps are of the layout this build writes ([`StampError`]).
    pub fn check_abi(&self) -> Result<(), StampError> {
        let meta = self.meta().map_err(StampError::Open)?;
        let stamp = meta
            .get(&meta_index::ABI_VERSION)
            .map_err(StampError::Read)?;
        abi_verdict(stamp)
    }

    /// Enrolls a pod recorded by the plugin, when the pins are there and of this build's
    /// map ABI (checked before any map is written).
    pub fn enroll_pod(&self, record: &PodRecord) -> Result<Enrollment, Error> {
        let pods = match self.pods() {
            Ok(m) => m,
            Err(e) => return Ok(Enrollment::NotLoaded(e)),
        };
        if let Err(why) = self.check_abi() {
            return Ok(Enrollment::OtherAbi(why));
        }
        let ips = self.pod_ips()?;
        write_enrollment(&pods, &ips, record)?;
        Ok(Enrollment::Enrolled)
    }

    /// Writes every record of an accelerated pod back into the enrollment maps (fresh ones,
    /// after an upgrade recreated them); returns how many.
    pub fn reenroll(&self, records: &[PodRecord]) -> Result<usize, Error> {
        let (pods, ips) = (self.pods()?, self.pod_ips()?);
        let mut n = 0;
        for r in records.iter().filter(|r| r.accelerate) {
            write_enrollment(&pods, &ips, r)?;
            n += 1;
        }
        Ok(n)
    }

    /// Removes a recorded pod's enrollment: its netns, the IPs still registered to it (an IP
    /// may already be a newer pod's), its counters. Pins of another map ABI, or none, are left
    /// alone.
    pub fn unenroll(&self, record: &PodRecord) -> Result<(), Error> {
        if !record.accelerate || self.check_abi().is_err() {
            return Ok(());
        }
        let Ok(pods) = self.pods() else {
            return Ok(());
        };
        let cookie = record.netns_cookie;
        pods.remove(&cookie).map_err(Error::step("remove netns"))?;
        if let Ok(ips) = self.pod_ips() {
            for key in record.ip_keys() {
                if ips.get(&key)? == Some(cookie) {
                    ips.remove(&key)?;
                }
            }
        }
        if let Ok(stats) = self.stats() {
            stats.remove(&cookie)?;
        }
        Ok(())
    }

    /// Every pod's counters summed over CPUs, by netns cookie (ascending).
    pub fn pod_counters(&self) -> Result<Vec<(u64, PodStats)>, Error> {
        let stats = self.stats()?;
        let mut out = Vec::new();
        for cookie in stats.keys()? {
            let Some(per_cpu) = stats.get(&cookie)? else {
                continue;
            };
            let mut sum = PodStats::default();
            per_cpu.iter().for_each(|s| add(&mut sum, s));
            out.push((cookie, sum));
        }
        out.sort_by_key(|(cookie, _)| *cookie);
        Ok(out)
    }
}

/// A pod's IPs first, then its netns: sock_ops finds a pod by its netns, and its IPs must be
/// known by then.
fn write_enrollment<H: MapOps>(
    pods: &TypedMap<u64, PodInfo, H>,
    ips: &TypedMap<IpKey, u64, H>,
    record: &PodRecord,
) -> Result<(), Error> {
    for ip in &record.ips {
        ips.set(&ip_key(*ip), &record.netns_cookie)
            .map_err(Error::step(format!("register {ip}")))?;
    }
    let info = PodInfo::new(true, &record.excluded_ports);
    pods.set(&record.netns_cookie, &info)
        .map_err(Error::step("enroll netns"))
}

/// Adds one CPU's counters to a sum.
pub fn add(into: &mut PodStats, s: &PodStats) {
    into.sockets_enrolled += s.sockets_enrolled;
    into.enroll_failures += s.enroll_failures;
    into.msgs_redirected += s.msgs_redirected;
    into.bytes_redirected += s.bytes_redirected;
    into.peer_misses += s.peer_misses;
    into.connections_paired += s.connections_paired;
    into.early_data_fallbacks += s.early_data_fallbacks;
    into.queue_demotions += s.queue_demotions;
    into.tcp_segments_held += s.tcp_segments_held;
}

#[cfg(test)]
mod tests;
