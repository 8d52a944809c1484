//! An in-memory [`Sys`]: maps "pinned" at paths, with the kernel's answers where the map logic
//! depends on them (ENOENT for a missing pin or key, E2BIG for a full hash map or an index past
//! an array, EINVAL for a delete in an array or a value of the wrong size), and errors injected
//! per map. As aya tests its map code against a fake syscall (aya/src/sys/fake.rs).
use crate::sys::{MapInfo, MapOps, Sys};
use fastpath_common::{MAP_LAYOUTS, MapLayout, map_type};
use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

/// The fake system: its pins, and its number of CPUs.
#[derive(Clone)]
pub struct FakeSys {
    pins: Arc<Mutex<HashMap<PathBuf, FakeMap>>>,
    cpus: usize,
}

/// A fake map; clones are the same map (as two fds of one map).
#[derive(Clone)]
pub struct FakeMap(Arc<Mutex<State>>);

struct State {
    info: MapInfo,
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
    /// errno every update fails with, when set.
    failing_updates: Option<i32>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl FakeSys {
    pub fn new(cpus: usize) -> Self {
        Self {
            pins: Arc::default(),
            cpus,
        }
    }

    /// Pins a map of this layout at `path` (replacing what was pinned there).
    pub fn pin(&self, path: &Path, layout: &MapLayout) -> FakeMap {
        let mut pins = self.pins.lock().expect("fake pins");
        let info = MapInfo {
            map_type: layout.map_type,
            id: pins.len() as u32 + 1,
            key_size: layout.key_size,
            value_size: layout.value_size,
            max_entries: layout.max_entries,
        };
        let mut entries = BTreeMap::new();
        if layout.map_type == map_type::ARRAY {
            for i in 0..layout.max_entries {
                entries.insert(
                    i.to_ne_bytes().to_vec(),
                    vec![0; layout.value_size as usize],
                );
            }
        }
        let map = FakeMap(Arc::new(Mutex::new(State {
            info,
            entries,
            failing_updates: None,
        })));
        pins.insert(path.to_path_buf(), map.clone());
        map
    }

    /// Pins every map of this build under `dir`, empty.
    pub fn pin_all(&self, dir: &Path) {
        for layout in &MAP_LAYOUTS {
            self.pin(&dir.join(layout.name), layout);
        }
    }

    pub fn unpin(&self, path: &Path) {
        self.pins.lock().expect("fake pins").remove(path);
    }

    /// The map pinned at `path`.
    pub fn map(&self, path: &Path) -> FakeMap {
        self.pins.lock().expect("fake pins")[path].clone()
    }

    /// Bytes of one value as userspace reads and writes it (per-CPU maps: one 8-byte aligned
    /// slot per CPU).
    fn value_len(&self, info: &MapInfo) -> usize {
        match info.map_type {
            map_type::PERCPU_HASH => (info.value_size as usize).next_multiple_of(8) * self.cpus,
            _ => info.value_size as usize,
        }
    }
}

impl FakeMap {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().expect("fake map")
    }

    /// Makes every later update fail with `errno` (`None`: succeed again).
    pub fn fail_updates(&self, errno: Option<i32>) {
        self.state().failing_updates = errno;
    }

    /// Writes an entry as raw bytes, past every check (what a probe would write).
    pub fn put_raw(&self, key: &[u8], value: &[u8]) {
        self.state().entries.insert(key.to_vec(), value.to_vec());
    }

    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A fake map as opened by one [`FakeSys`] (whose CPU count sizes per-CPU values).
pub struct FakeHandle {
    map: FakeMap,
    value_len: usize,
}

impl Sys for FakeSys {
    type Map = FakeHandle;

    fn obj_get(&self, path: &Path) -> io::Result<FakeHandle> {
        let map = self
            .pins
            .lock()
            .expect("fake pins")
            .get(path)
            .cloned()
            .ok_or_else(|| errno(libc::ENOENT))?;
        let value_len = self.value_len(&map.state().info);
        Ok(FakeHandle { map, value_len })
    }

    fn possible_cpus(&self) -> io::Result<usize> {
        Ok(self.cpus)
    }
}

impl FakeHandle {
    fn check(&self, s: &State, key: &[u8], value_len: Option<usize>) -> io::Result<()> {
        let bad_value = value_len.is_some_and(|n| n != self.value_len);
        if key.len() != s.info.key_size as usize || bad_value {
            return Err(errno(libc::EINVAL));
        }
        Ok(())
    }
}

impl MapOps for FakeHandle {
    fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        let s = self.map.state();
        self.check(&s, key, Some(value.len()))?;
        match s.entries.get(key) {
            Some(v) => {
                value.copy_from_slice(v);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let mut s = self.map.state();
        self.check(&s, key, Some(value.len()))?;
        if let Some(e) = s.failing_updates {
            return Err(errno(e));
        }
        let full = s.entries.len() >= s.info.max_entries as usize;
        if !s.entries.contains_key(key) && (full || s.info.map_type == map_type::ARRAY) {
            return Err(errno(libc::E2BIG));
        }
        s.entries.insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn delete(&self, key: &[u8]) -> io::Result<bool> {
        let mut s = self.map.state();
        self.check(&s, key, None)?;
        if s.info.map_type == map_type::ARRAY {
            return Err(errno(libc::EINVAL));
        }
        Ok(s.entries.remove(key).is_some())
    }

    fn next_key(&self, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
        let s = self.map.state();
        // As the kernel's hash maps: after a key that is gone, the walk starts over.
        let after = key.filter(|k| s.entries.contains_key(*k));
        let found = match after {
            Some(k) => s.entries.range(k.to_vec()..).nth(1),
            None => s.entries.iter().next(),
        };
        match found {
            Some((k, _)) => {
                next.copy_from_slice(k);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn info(&self) -> io::Result<MapInfo> {
        Ok(self.map.state().info)
    }
}
