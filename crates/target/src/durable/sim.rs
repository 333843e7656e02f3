//! A simulated disk for the power-cut tests: a [`Store`] that remembers what is
//! durable and, on a simulated power cut, keeps, drops or tears (per 512-byte
//! sector) every write not yet synced — seeded, so a failing cut replays exactly.
//!
//! Model: each file (inode) has its durable bytes and the writes since its last
//! sync, in order. Directory entries (create, rename, remove) become durable at
//! `sync_dir`; at a cut an ordered prefix of the ones after it survives (a
//! journaling filesystem commits metadata in order). `crash_after(n)` makes the
//! n-th mutating call and everything after it fail with EIO, like a process that
//! died at that moment; `power_cut` then yields the disk a restart would find.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::store::Store;

pub(crate) const SECTOR: usize = 512;

#[derive(Clone, Debug)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Clone, Debug, Default)]
struct Inode {
    durable: Vec<u8>,
    cur: Vec<u8>,
    pending: Vec<Pending>,
}

#[derive(Clone, Debug)]
enum DirOp {
    Link(String, usize),
    Unlink(String),
    /// One atomic step, like rename(2): `from` goes and `to` names the inode.
    Rename(String, String, usize),
}

#[derive(Debug, Default)]
struct State {
    inodes: Vec<Inode>,
    names: HashMap<String, usize>,
    durable_names: HashMap<String, usize>,
    dir_pending: Vec<DirOp>,
    /// Mutating calls left before the simulated crash; `None`: no crash planned.
    ops_left: Option<u64>,
    dead: bool,
    /// Mutating calls so far (to pick cut points).
    ops: u64,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct SimStore {
    st: Mutex<State>,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

fn apply_write(buf: &mut Vec<u8>, off: u64, data: &[u8]) {
    let off = off as usize;
    if buf.len() < off + data.len() {
        buf.resize(off + data.len(), 0);
    }
    buf[off..off + data.len()].copy_from_slice(data);
}

impl SimStore {
    pub(crate) fn new() -> SimStore {
        SimStore::default()
    }

    /// The `n`-th mutating call from now (0: the next) fails, and so does every
    /// call after it, until [`power_cut`](Self::power_cut).
    pub(crate) fn crash_after(&self, n: u64) {
        self.st.lock().unwrap().ops_left = Some(n);
    }

    /// Mutating calls made so far.
    pub(crate) fn ops(&self) -> u64 {
        self.st.lock().unwrap().ops
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.st.lock().unwrap().dead
    }

    /// Power loss: every unsynced write is kept, dropped or torn per sector, and an
    /// ordered prefix of the unsynced directory changes survives. Afterwards the
    /// store is alive again and everything in it is durable.
    pub(crate) fn power_cut(&self, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut st = self.st.lock().unwrap();
        for ino in st.inodes.iter_mut() {
            let mut img = std::mem::take(&mut ino.durable);
            for p in std::mem::take(&mut ino.pending) {
                match p {
                    Pending::SetLen(l) => {
                        if rng.gen_bool(0.5) {
                            img.resize(l as usize, 0);
                        }
                    }
                    Pending::Write(off, data) => match rng.gen_range(0..3) {
                        0 => {}
                        1 => apply_write(&mut img, off, &data),
                        _ => {
                            // Torn: each sector of the write independently.
                            let mut at = 0usize;
                            while at < data.len() {
                                let o = off as usize + at;
                                let n = (SECTOR - o % SECTOR).min(data.len() - at);
                                if rng.gen_bool(0.5) {
                                    apply_write(&mut img, o as u64, &data[at..at + n]);
                                }
                                at += n;
                            }
                        }
                    },
                }
            }
            ino.cur = img.clone();
            ino.durable = img;
        }
        let keep = rng.gen_range(0..=st.dir_pending.len());
        let ops: Vec<DirOp> = st.dir_pending.drain(..).take(keep).collect();
        let mut names = st.durable_names.clone();
        for op in ops {
            match op {
                DirOp::Link(n, i) => {
                    names.insert(n, i);
                }
                DirOp::Unlink(n) => {
                    names.remove(&n);
                }
                DirOp::Rename(from, to, i) => {
                    names.remove(&from);
                    names.insert(to, i);
                }
            }
        }
        st.names = names.clone();
        st.durable_names = names;
        st.dead = false;
        st.ops_left = None;
    }

    /// A mutating call: counts down to the planned crash.
    fn mutate(st: &mut State) -> io::Result<()> {
        if st.dead {
            return Err(eio());
        }
        st.ops += 1;
        if let Some(n) = st.ops_left.as_mut() {
            if *n == 0 {
                st.dead = true;
                return Err(eio());
            }
            *n -= 1;
        }
        Ok(())
    }

    fn ino(st: &State, name: &str) -> io::Result<usize> {
        if st.dead {
            return Err(eio());
        }
        st.names.get(name).copied().ok_or_else(enoent)
    }

    /// The current content of `name` (what reads see), for test assertions.
    pub(crate) fn contents(&self, name: &str) -> Option<Vec<u8>> {
        let st = self.st.lock().unwrap();
        st.names.get(name).map(|&i| st.inodes[i].cur.clone())
    }
}

impl Store for SimStore {
    fn create(&self, name: &str) -> io::Result<()> {
        let mut st = self.st.lock().unwrap();
        Self::mutate(&mut st)?;
        let i = st.inodes.len();
        st.inodes.push(Inode::default());
        st.names.insert(name.to_string(), i);
        st.dir_pending.push(DirOp::Link(name.to_string(), i));
        Ok(())
    }

    fn exists(&self, name: &str) -> bool {
        let st = self.st.lock().unwrap();
        st.names.contains_key(name)
    }

    fn read_at(&self, name: &str, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        let st = self.st.lock().unwrap();
        let i = Self::ino(&st, name)?;
        let cur = &st.inodes[i].cur;
        let off = off as usize;
        if off >= cur.len() {
            return Ok(0);
        }
        let n = buf.len().min(cur.len() - off);
        buf[..n].copy_from_slice(&cur[off..off + n]);
        Ok(n)
    }

    fn write_at(&self, name: &str, off: u64, data: &[u8]) -> io::Result<()> {
        let mut st = self.st.lock().unwrap();
        let i = Self::ino(&st, name)?;
        Self::mutate(&mut st)?;
        let ino = &mut st.inodes[i];
        apply_write(&mut ino.cur, off, data);
        ino.pending.push(Pending::Write(off, data.to_vec()));
        Ok(())
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        let mut st = self.st.lock().unwrap();
        let i = Self::ino(&st, name)?;
        Self::mutate(&mut st)?;
        let ino = &mut st.inodes[i];
        ino.durable = ino.cur.clone();
        ino.pending.clear();
        Ok(())
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        let st = self.st.lock().unwrap();
        let i = Self::ino(&st, name)?;
        Ok(st.inodes[i].cur.len() as u64)
    }

    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        let mut st = self.st.lock().unwrap();
        let i = Self::ino(&st, name)?;
        Self::mutate(&mut st)?;
        let ino = &mut st.inodes[i];
        ino.cur.resize(len as usize, 0);
        ino.pending.push(Pending::SetLen(len));
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut st = self.st.lock().unwrap();
        let i = Self::ino(&st, from)?;
        Self::mutate(&mut st)?;
        st.names.remove(from);
        st.names.insert(to.to_string(), i);
        // One atomic step of the directory: both changes survive a cut or neither.
        st.dir_pending
            .push(DirOp::Rename(from.to_string(), to.to_string(), i));
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut st = self.st.lock().unwrap();
        Self::mutate(&mut st)?;
        if st.names.remove(name).is_some() {
            st.dir_pending.push(DirOp::Unlink(name.to_string()));
        }
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut st = self.st.lock().unwrap();
        Self::mutate(&mut st)?;
        st.durable_names = st.names.clone();
        st.dir_pending.clear();
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let st = self.st.lock().unwrap();
        if st.dead {
            return Err(eio());
        }
        let mut v: Vec<String> = st.names.keys().cloned().collect();
        v.sort();
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_data_survives_and_unsynced_may_tear() {
        let s = SimStore::new();
        s.create("f").unwrap();
        s.sync_dir().unwrap();
        s.write_at("f", 0, &[1u8; 1024]).unwrap();
        s.sync("f").unwrap();
        s.write_at("f", 0, &[2u8; 4096]).unwrap();
        s.create("g").unwrap();
        let mut seen = std::collections::HashSet::new();
        for seed in 0..64 {
            let t = SimStore::new();
            t.create("f").unwrap();
            t.sync_dir().unwrap();
            t.write_at("f", 0, &[1u8; 1024]).unwrap();
            t.sync("f").unwrap();
            t.write_at("f", 0, &[2u8; 4096]).unwrap();
            t.power_cut(seed);
            let c = t.contents("f").unwrap();
            // Sector by sector: old (1; zeros past 1 KiB) or new (2), never a mix.
            for (i, sec) in c.chunks(SECTOR).enumerate() {
                let first = sec[0];
                assert!(sec.iter().all(|&b| b == first));
                assert!(first == 2 || first == if i < 2 { 1 } else { 0 });
            }
            seen.insert(c.len());
        }
        assert!(seen.len() > 1, "cuts must differ by seed: {seen:?}");
        // A crash makes every later call fail until the power cut.
        s.crash_after(0);
        assert!(s.write_at("f", 0, &[3]).is_err());
        assert!(s.is_dead() && s.sync("f").is_err());
        s.power_cut(1);
        assert!(!s.is_dead() && s.ops() > 0);
        assert!(s.exists("f"));
    }
}
