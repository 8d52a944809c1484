//! A pinned map, opened, with typed keys and values. Every error names the command and the
//! map's pin path.
use crate::{
    Error,
    sys::{Cmd, MapInfo, MapOps},
};
use std::{
    marker::PhantomData,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

/// Plain old data that is a map key or value as its bytes: `#[repr(C)]`, no padding the kernel
/// could read uninitialised, every bit pattern valid.
///
/// # Safety
/// Implement it only for such types.
pub unsafe trait Plain: Copy + Default + 'static {}

// SAFETY: integers and the repr(C) layouts shared with the probes (fastpath-common), whose
// padding is explicit fields.
unsafe impl Plain for u32 {}
unsafe impl Plain for u64 {}
unsafe impl Plain for fastpath_common::PodInfo {}
unsafe impl Plain for fastpath_common::IpKey {}
unsafe impl Plain for fastpath_common::PodStats {}
unsafe impl Plain for fastpath_common::RxQueue {}
unsafe impl Plain for fastpath_common::SockKey {}
unsafe impl Plain for fastpath_common::SockState {}
unsafe impl Plain for fastpath_common::Endpoint {}
unsafe impl Plain for fastpath_common::ActiveConn {}
unsafe impl Plain for fastpath_common::PendingSyn {}

fn bytes<T: Plain>(v: &T) -> &[u8] {
    // SAFETY: Plain types are plain bytes of their size.
    unsafe { std::slice::from_raw_parts((v as *const T).cast(), size_of::<T>()) }
}

fn bytes_mut<T: Plain>(v: &mut T) -> &mut [u8] {
    // SAFETY: Plain types are plain bytes of their size, and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts_mut((v as *mut T).cast(), size_of::<T>()) }
}

/// A map opened from its pin, untyped: what is common to every map.
pub struct Map<H = OwnedFd> {
    path: PathBuf,
    handle: H,
}

impl<H: MapOps> Map<H> {
    pub(crate) fn new(path: PathBuf, handle: H) -> Self {
        Self { path, handle }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, cmd: Cmd) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |error| Error::Bpf {
            cmd,
            path: self.path.clone(),
            error,
        }
    }

    /// Its layout and id, as the kernel reports them.
    pub fn info(&self) -> Result<MapInfo, Error> {
        self.handle.info().map_err(self.err(Cmd::ObjGetInfoByFd))
    }

    /// Number of keys (walks the map).
    pub fn count(&self) -> Result<usize, Error> {
        let size = self.info()?.key_size as usize;
        let mut n = 0;
        self.walk(size, |_| n += 1)?;
        Ok(n)
    }

    /// Calls `each` with every key, as bytes of `key_size`.
    fn walk(&self, key_size: usize, mut each: impl FnMut(&[u8])) -> Result<(), Error> {
        let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
        let mut first = true;
        loop {
            let more = self
                .handle
                .next_key((!first).then_some(&key[..]), &mut next)
                .map_err(self.err(Cmd::MapGetNextKey))?;
            if !more {
                return Ok(());
            }
            each(&next);
            std::mem::swap(&mut key, &mut next);
            first = false;
        }
    }

    fn lookup_into(&self, key: &[u8], value: &mut [u8]) -> Result<bool, Error> {
        self.handle
            .lookup(key, value)
            .map_err(self.err(Cmd::MapLookupElem))
    }

    fn update_raw(&self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        self.handle
            .update(key, value)
            .map_err(self.err(Cmd::MapUpdateElem))
    }

    fn delete_raw(&self, key: &[u8]) -> Result<bool, Error> {
        self.handle
            .delete(key)
            .map_err(self.err(Cmd::MapDeleteElem))
    }

    /// Typed as keys `K` to values `V`.
    pub fn typed<K: Plain, V: Plain>(self) -> TypedMap<K, V, H> {
        TypedMap {
            map: self,
            kv: PhantomData,
        }
    }
}

impl AsFd for Map<OwnedFd> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.handle.as_fd()
    }
}

/// A map of `K` to `V` (a hash map, an array with `K = u32`, a sockhash with `V` the socket's
/// fd as `u32`).
pub struct TypedMap<K, V, H = OwnedFd> {
    map: Map<H>,
    kv: PhantomData<(K, V)>,
}

impl<K: Plain, V: Plain, H: MapOps> TypedMap<K, V, H> {
    pub fn map(&self) -> &Map<H> {
        &self.map
    }

    pub fn get(&self, key: &K) -> Result<Option<V>, Error> {
        let mut v = V::default();
        Ok(self
            .map
            .lookup_into(bytes(key), bytes_mut(&mut v))?
            .then_some(v))
    }

    pub fn set(&self, key: &K, value: &V) -> Result<(), Error> {
        self.map.update_raw(bytes(key), bytes(value))
    }

    /// Removes `key`; false when it was not there.
    pub fn remove(&self, key: &K) -> Result<bool, Error> {
        self.map.delete_raw(bytes(key))
    }

    pub fn keys(&self) -> Result<Vec<K>, Error> {
        self.map.typed_keys()
    }

    /// Every entry; a key removed between the walk and its lookup is left out.
    pub fn entries(&self) -> Result<Vec<(K, V)>, Error> {
        let mut out = Vec::new();
        for k in self.keys()? {
            if let Some(v) = self.get(&k)? {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    pub fn count(&self) -> Result<usize, Error> {
        self.map.count()
    }
}

impl<V: Plain, H: MapOps> TypedMap<u32, V, H> {
    /// The entries of an array, by index (0 for an index that cannot be read).
    pub fn values(&self) -> Result<Vec<V>, Error> {
        let len = self.map.info()?.max_entries;
        (0..len)
            .map(|i| self.get(&i).map(Option::unwrap_or_default))
            .collect()
    }
}

/// A per-CPU map of `K` to one `V` per possible CPU.
pub struct PerCpuMap<K, V, H = OwnedFd> {
    map: Map<H>,
    cpus: usize,
    kv: PhantomData<(K, V)>,
}

impl<K: Plain, V: Plain, H: MapOps> PerCpuMap<K, V, H> {
    pub(crate) fn new(map: Map<H>, cpus: usize) -> Self {
        Self {
            map,
            cpus,
            kv: PhantomData,
        }
    }

    /// The kernel copies each CPU's value into an 8-byte aligned slot.
    fn slot() -> usize {
        size_of::<V>().next_multiple_of(8)
    }

    pub fn get(&self, key: &K) -> Result<Option<Vec<V>>, Error> {
        let mut buf = vec![0u8; Self::slot() * self.cpus];
        if !self.map.lookup_into(bytes(key), &mut buf)? {
            return Ok(None);
        }
        let values = buf
            .chunks(Self::slot())
            .map(|c| {
                let mut v = V::default();
                bytes_mut(&mut v).copy_from_slice(&c[..size_of::<V>()]);
                v
            })
            .collect();
        Ok(Some(values))
    }

    pub fn remove(&self, key: &K) -> Result<bool, Error> {
        self.map.delete_raw(bytes(key))
    }

    pub fn keys(&self) -> Result<Vec<K>, Error> {
        self.map.typed_keys()
    }
}

impl<H: MapOps> Map<H> {
    fn typed_keys<K: Plain>(&self) -> Result<Vec<K>, Error> {
        let mut out = Vec::new();
        self.walk(size_of::<K>(), |b| {
            let mut k = K::default();
            bytes_mut(&mut k).copy_from_slice(b);
            out.push(k);
        })?;
        Ok(out)
    }
}
