//! Device-side status words that ops leave for a later check, kept per thread.
//!
//! No op waits for the device, so an error only the kernel can see (a class target out
//! of range) is written to a status word and read at the next readback or synchronize.
//! The words are kept per calling thread: the check belongs to the thread that queued
//! the op, so one thread's bad data never fails another thread's readback (or is
//! swallowed by it). A thread that exits without a readback after its last op leaves
//! its words here for the life of the backend: a few bytes of device memory each.

use std::collections::HashMap;
use std::sync::Mutex;
use std::thread::ThreadId;

/// The status words `W` queued by each thread since its last check.
pub(crate) struct Watches<W> {
    by_thread: Mutex<HashMap<ThreadId, Vec<W>>>,
}

impl<W> Default for Watches<W> {
    fn default() -> Self {
        Watches {
            by_thread: Mutex::new(HashMap::new()),
        }
    }
}

impl<W> Watches<W> {
    /// Keeps `watch` for the calling thread's next check.
    pub(crate) fn push(&self, watch: W) {
        self.lock()
            .entry(std::thread::current().id())
            .or_default()
            .push(watch);
    }

    /// The calling thread's words, oldest first, removed from the list.
    pub(crate) fn take(&self) -> Vec<W> {
        self.lock()
            .remove(&std::thread::current().id())
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ThreadId, Vec<W>>> {
        // Entries are inserted and removed whole, so a poisoned map is still consistent.
        self.by_thread.lock().unwrap_or_else(|e| e.into_inner())
    }
}
