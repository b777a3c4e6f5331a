//! The active L1 table and the L2 slice cache. Readers find an L2 entry
//! without taking a lock: the L1 table and each slice hold their entries in
//! atomics, and a slice is reached through a lock-free slot (`ArcSwapOption`)
//! per (L1 index, slice index). Loading a slice is single-flight: the first
//! request installs an empty slice and reads it, later ones wait for it.
//!
//! Changes go through `modify`, which holds the read side of `guard` while it
//! updates entries and counts the change. The write side is taken by eviction
//! (which drops only clean slices) and by the writeback snapshot, so a change
//! is never made to a slice that has just left the cache, and a snapshot sees
//! either all of a change or none of it. No lock is held across I/O.
//!
//! A slice is dirty while `mods != written`; writeback records the `mods` it
//! copied and raises `written` to it once the copy is on disk. This module
//! does not write anything itself: `flush.rs` does, in the order qcow2 needs.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Poll, Waker};

use arc_swap::{ArcSwap, ArcSwapOption};
use engine::block::BlockNode;
use engine::error::Result;
use engine::runtime::IoBuf;

/// A one-shot "done" signal any shard can wait on.
#[derive(Default)]
pub struct Event {
    done: AtomicBool,
    waiters: Mutex<Vec<Waker>>,
}

impl Event {
    pub fn set(&self) {
        self.done.store(true, Ordering::Release);
        let w = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|e| e.into_inner()));
        for w in w {
            w.wake();
        }
    }
    pub fn is_set(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.is_set() {
                return Poll::Ready(());
            }
            let mut g = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            // Checked again under the lock: set() takes it after storing done.
            if self.is_set() {
                return Poll::Ready(());
            }
            g.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// One cached slice of an L2 table.
pub struct L2Slice {
    pub l1_index: usize,
    pub slice_index: usize,
    /// Where the slice lives in the image file.
    pub host: u64,
    /// Entries as on disk but native-endian: one u64 per entry, or two
    /// (descriptor, subcluster bitmap) with extended L2.
    pub words: Box<[AtomicU64]>,
    mods: AtomicU64,
    written: AtomicU64,
    referenced: AtomicBool,
    ready: Event,
    failed: AtomicBool,
}

impl L2Slice {
    fn new(l1_index: usize, slice_index: usize, host: u64, words: usize) -> L2Slice {
        L2Slice {
            l1_index,
            slice_index,
            host,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            mods: AtomicU64::new(0),
            written: AtomicU64::new(0),
            referenced: AtomicBool::new(true),
            ready: Event::default(),
            failed: AtomicBool::new(false),
        }
    }

    pub fn word(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::Acquire)
    }

    pub fn set_word(&self, i: usize, v: u64) {
        self.words[i].store(v, Ordering::Release);
    }

    pub fn is_dirty(&self) -> bool {
        self.mods.load(Ordering::Acquire) != self.written.load(Ordering::Acquire)
    }

    /// The slice as it goes on disk, and the change count it reflects.
    pub fn snapshot(&self) -> (u64, Vec<u8>) {
        let m = self.mods.load(Ordering::Acquire);
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in self.words.iter() {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_be_bytes());
        }
        (m, out)
    }

    pub fn mark_written(&self, m: u64) {
        self.written.fetch_max(m, Ordering::AcqRel);
    }

    /// The table this slice belongs to was freed: never write it back.
    fn forget(&self) {
        self.written.store(u64::MAX, Ordering::Release);
        self.mods.store(u64::MAX, Ordering::Release);
    }
}

/// Empties a slot whose load was abandoned or failed, and releases waiters.
struct LoadGuard<'a> {
    slice: Arc<L2Slice>,
    slot: &'a ArcSwapOption<L2Slice>,
    armed: bool,
}

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.slice.failed.store(true, Ordering::Release);
            self.slot.compare_and_swap(&Some(self.slice.clone()), None);
            self.slice.ready.set();
        }
    }
}

type Slots = Arc<[ArcSwapOption<L2Slice>]>;

/// The active L1 table with the cache slots of each entry's L2 table.
pub struct L1 {
    pub entries: Box<[AtomicU64]>,
    slots: Box<[OnceLock<Slots>]>,
}

impl L1 {
    pub fn new(entries: Vec<u64>) -> L1 {
        let n = entries.len();
        L1 { entries: entries.into_iter().map(AtomicU64::new).collect(), slots: (0..n).map(|_| OnceLock::new()).collect() }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, i: usize) -> u64 {
        self.entries[i].load(Ordering::Acquire)
    }

    /// A copy with `n` entries (growing with zeroes), sharing the slots.
    pub fn resized(&self, n: usize) -> L1 {
        let entries = (0..n).map(|i| AtomicU64::new(if i < self.len() { self.get(i) } else { 0 })).collect();
        let slots = (0..n)
            .map(|i| {
                let s = OnceLock::new();
                if let Some(v) = self.slots.get(i).and_then(|o| o.get()) {
                    let _ = s.set(v.clone());
                }
                s
            })
            .collect();
        L1 { entries, slots }
    }

    pub fn snapshot(&self, range: std::ops::Range<usize>) -> Vec<u8> {
        let mut out = Vec::with_capacity(range.len() * 8);
        for i in range {
            out.extend_from_slice(&self.get(i).to_be_bytes());
        }
        out
    }
}

pub struct L2Cache {
    /// Entries (u64 words counting the bitmap words) per slice.
    pub slice_words: usize,
    pub slice_bytes: usize,
    pub slices_per_table: usize,
    capacity: AtomicUsize,
    count: AtomicUsize,
    pub l1: ArcSwap<L1>,
    /// Read side: a change in progress. Write side: eviction, snapshots,
    /// L1 replacement.
    pub guard: RwLock<()>,
    /// Slices in the cache, in clock order.
    clock: Mutex<std::collections::VecDeque<Arc<L2Slice>>>,
    /// L1 entries (by index) changed since the last writeback.
    pub l1_dirty: Mutex<std::collections::BTreeSet<usize>>,
    /// Host offsets of slices of L2 tables this process allocated (and
    /// wrote as zeroes) that were never loaded since: loading one is no
    /// read. Without this a growing image read each new 4 KiB slice back
    /// from disk, and every write into its 32 MiB waited for that read
    /// (64 reads in a 2 GiB write, one each 16 ms).
    fresh: Mutex<std::collections::HashSet<u64>>,
}

/// What `modify` is handed: the slice and the word index of the entry.
pub struct Entry<'a> {
    pub slice: &'a L2Slice,
    pub word: usize,
}

impl L2Cache {
    pub fn new(l1: L1, slice_bytes: usize, table_bytes: usize, capacity_slices: usize) -> L2Cache {
        L2Cache {
            slice_words: slice_bytes / 8,
            slice_bytes,
            slices_per_table: table_bytes / slice_bytes,
            // A few slices whatever the option says: requests in flight pin some.
            capacity: AtomicUsize::new(capacity_slices.max(16)),
            count: AtomicUsize::new(0),
            l1: ArcSwap::from_pointee(l1),
            guard: RwLock::new(()),
            clock: Mutex::new(Default::default()),
            l1_dirty: Mutex::new(Default::default()),
            fresh: Mutex::new(Default::default()),
        }
    }

    /// The L2 table at `l2_off` was just allocated and written as zeroes.
    pub fn mark_fresh(&self, l2_off: u64) {
        let mut f = self.fresh.lock().unwrap_or_else(|e| e.into_inner());
        f.extend((0..self.slices_per_table).map(|i| l2_off + (i * self.slice_bytes) as u64));
    }

    fn slots(&self, l1: &L1, l1_index: usize) -> Slots {
        l1.slots[l1_index].get_or_init(|| (0..self.slices_per_table).map(|_| ArcSwapOption::empty()).collect()).clone()
    }

    /// The slice holding entry `l2_index` of the L2 table at `l2_off`
    /// (listed in L1 entry `l1_index`), loaded from `file` if needed. Returns
    /// the slice and the index of the entry's first word in it.
    pub async fn get(&self, file: &dyn BlockNode, l1_index: usize, l2_off: u64, l2_index: usize, entry_words: usize) -> Result<(Arc<L2Slice>, usize)> {
        let per_slice = self.slice_words / entry_words;
        let slice_index = l2_index / per_slice;
        let word = (l2_index % per_slice) * entry_words;
        let slots = self.slots(&self.l1.load(), l1_index);
        let slot = &slots[slice_index];
        let host = l2_off + (slice_index * self.slice_bytes) as u64;
        loop {
            if let Some(s) = slot.load_full() {
                if !s.ready.is_set() {
                    s.ready.wait().await;
                }
                if s.failed.load(Ordering::Acquire) {
                    continue; // its loader emptied the slot: load it ourselves
                }
                if s.host == host {
                    if !s.referenced.load(Ordering::Relaxed) {
                        s.referenced.store(true, Ordering::Relaxed);
                    }
                    return Ok((s, word));
                }
                // A slice of a table this L1 entry no longer points to.
                let _g = self.guard.write().unwrap_or_else(|e| e.into_inner());
                if slot.load().as_ref().is_some_and(|c| Arc::ptr_eq(c, &s)) {
                    s.forget();
                    slot.store(None);
                }
                continue;
            }
            let fresh = Arc::new(L2Slice::new(l1_index, slice_index, host, self.slice_words));
            let prev = slot.compare_and_swap(&None::<Arc<L2Slice>>, Some(fresh.clone()));
            if prev.is_some() {
                continue; // someone else is loading it
            }
            // If this future is dropped mid-read, waiters must not hang.
            let mut abort = LoadGuard { slice: fresh.clone(), slot, armed: true };
            // A slice of a table we allocated and never loaded is zeroes,
            // as the slice starts.
            if !self.fresh.lock().unwrap_or_else(|e| e.into_inner()).remove(&host) {
                let (r, buf) = file.read(host, IoBuf::new(self.slice_bytes)).await;
                r?;
                for (i, w) in buf.chunks_exact(8).enumerate() {
                    fresh.words[i].store(u64::from_be_bytes(w.try_into().expect("8 bytes")), Ordering::Relaxed);
                }
            }
            abort.armed = false;
            drop(abort);
            self.clock.lock().unwrap_or_else(|e| e.into_inner()).push_back(fresh.clone());
            fresh.ready.set();
            if self.count.fetch_add(1, Ordering::AcqRel) + 1 > self.capacity.load(Ordering::Relaxed) {
                self.evict();
            }
            return Ok((fresh, word));
        }
    }

    /// Look at a cached entry without loading anything or touching shared
    /// counters: the hot path of every request. None if the slice is not in
    /// the cache (then use `get`).
    pub fn peek<R>(&self, l1: &L1, l1_index: usize, l2_off: u64, l2_index: usize, entry_words: usize, f: impl FnOnce(&L2Slice, usize) -> R) -> Option<R> {
        let per_slice = self.slice_words / entry_words;
        let slice_index = l2_index / per_slice;
        let slots = l1.slots.get(l1_index)?.get()?;
        let g = slots[slice_index].load();
        let s = g.as_ref()?;
        if !s.ready.is_set() || s.failed.load(Ordering::Acquire) || s.host != l2_off + (slice_index * self.slice_bytes) as u64 {
            return None;
        }
        if !s.referenced.load(Ordering::Relaxed) {
            s.referenced.store(true, Ordering::Relaxed);
        }
        Some(f(s, (l2_index % per_slice) * entry_words))
    }

    pub fn over_capacity(&self) -> bool {
        self.count.load(Ordering::Acquire) > self.capacity.load(Ordering::Relaxed)
    }

    /// Apply `f` to an entry as one change, counted for writeback. Retries if
    /// the slice left the cache in between.
    pub async fn modify<R>(
        &self,
        file: &dyn BlockNode,
        l1_index: usize,
        l2_off: u64,
        l2_index: usize,
        entry_words: usize,
        f: impl FnOnce(Entry<'_>) -> R,
    ) -> Result<R> {
        let mut f = Some(f);
        loop {
            let (s, word) = self.get(file, l1_index, l2_off, l2_index, entry_words).await?;
            let slots = self.slots(&self.l1.load(), l1_index);
            let _g = self.guard.read().unwrap_or_else(|e| e.into_inner());
            let cur = slots[s.slice_index].load();
            if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, &s)) {
                let r = (f.take().expect("called once"))(Entry { slice: &s, word });
                s.mods.fetch_add(1, Ordering::AcqRel);
                return Ok(r);
            }
        }
    }

    /// Drop clean, unreferenced slices until the cache is within capacity.
    /// Returns true if dirty slices keep it over (a writeback would help).
    pub fn evict(&self) -> bool {
        let cap = self.capacity.load(Ordering::Relaxed);
        self.sweep(cap, 2);
        self.count.load(Ordering::Acquire) > cap
    }

    /// `cache-clean-interval`: drop every clean slice no request used since
    /// the last call (the clock's referenced bits are cleared as it passes).
    pub fn clean_unused(&self) {
        self.sweep(0, 1);
    }

    /// Walk the clock up to `passes` times round, dropping slices that are
    /// clean, not held by a request and not referenced since the last visit,
    /// until at most `keep` remain.
    fn sweep(&self, keep: usize, passes: usize) {
        let _g = self.guard.write().unwrap_or_else(|e| e.into_inner());
        let mut clock = self.clock.lock().unwrap_or_else(|e| e.into_inner());
        let mut budget = clock.len() * passes;
        while self.count.load(Ordering::Acquire) > keep && budget > 0 {
            budget -= 1;
            let Some(s) = clock.pop_front() else { break };
            let l1 = self.l1.load();
            let slot_gone = s.l1_index >= l1.len()
                || l1.slots[s.l1_index].get().is_none_or(|slots| !slots[s.slice_index].load().as_ref().is_some_and(|c| Arc::ptr_eq(c, &s)));
            if slot_gone {
                // Forgotten (its table was freed): nothing to write back.
                self.count.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            // In use (a request holds it beyond the clock's and the slot's
            // references), recently used, or dirty: keep it.
            if Arc::strong_count(&s) > 2 || s.referenced.swap(false, Ordering::Relaxed) || s.is_dirty() {
                clock.push_back(s);
                continue;
            }
            if let Some(slots) = l1.slots[s.l1_index].get() {
                slots[s.slice_index].store(None);
            }
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Slices cached now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Dirty slices, for writeback. Call with `guard` held for writing.
    pub fn dirty_slices(&self) -> Vec<Arc<L2Slice>> {
        self.clock.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|s| s.is_dirty()).cloned().collect()
    }

    /// Forget every cached slice of L1 entry `l1_index` (its table was freed).
    pub fn forget_table(&self, l1_index: usize) {
        // Its offset may come back as another table's: know nothing fresh.
        self.fresh.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let l1 = self.l1.load();
        if let Some(slots) = l1.slots.get(l1_index).and_then(|o| o.get()) {
            let _g = self.guard.write().unwrap_or_else(|e| e.into_inner());
            for s in slots.iter() {
                if let Some(old) = s.swap(None) {
                    old.forget();
                }
            }
        }
    }

    /// Forget every cached slice (their tables were rewritten on disk).
    pub fn forget_all(&self) {
        self.fresh.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let _g = self.guard.write().unwrap_or_else(|e| e.into_inner());
        for s in self.clock.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let l1 = self.l1.load();
            if let Some(slots) = l1.slots.get(s.l1_index).and_then(|o| o.get()) {
                if slots[s.slice_index].load().as_ref().is_some_and(|c| Arc::ptr_eq(c, s)) {
                    slots[s.slice_index].store(None);
                }
            }
            s.forget();
        }
    }

    pub fn mark_l1_dirty(&self, i: usize) {
        self.l1_dirty.lock().unwrap_or_else(|e| e.into_inner()).insert(i);
    }
}
