//! Sharing a pool (or a whole cache) between an interrupt handler and the
//! main loop, or between cores: a wrapper over a `lock_api` raw mutex,
//! `spin` by default.
//!
//! On one core, code that can be interrupted while holding the lock must not
//! be re-entered by the interrupt with a blocking `lock`: the handler uses
//! [`Shared::try_with`] and defers its work when the lock is taken (or the
//! caller picks a raw mutex that masks interrupts).

use lock_api::{Mutex, RawMutex};

/// A value behind a raw mutex `R` (default: `spin`).
pub struct Shared<T, R: RawMutex = spin::Mutex<()>> {
    inner: Mutex<R, T>,
}

impl<T, R: RawMutex> Shared<T, R> {
    /// Wraps `value` (usable in a `static`).
    pub const fn new(value: T) -> Self {
        Self {
            inner: Mutex::const_new(R::INIT, value),
        }
    }

    /// Runs `f` with the value, waiting for the lock.
    pub fn with<U>(&self, f: impl FnOnce(&mut T) -> U) -> U {
        f(&mut self.inner.lock())
    }

    /// Runs `f` with the value if the lock is free now; `None` otherwise
    /// (an interrupt handler then defers its work).
    pub fn try_with<U>(&self, f: impl FnOnce(&mut T) -> U) -> Option<U> {
        self.inner.try_lock().map(|mut g| f(&mut g))
    }

    /// The value, by exclusive access (no locking).
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }

    /// Unwraps the value.
    pub fn into_inner(self) -> T {
        self.inner.into_inner()
    }
}

impl<T: core::fmt::Debug, R: RawMutex> core::fmt::Debug for Shared<T, R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.inner.try_lock() {
            Some(g) => f.debug_tuple("Shared").field(&*g).finish(),
            None => f.write_str("Shared(<locked>)"),
        }
    }
}

/// A block pool shared between contexts.
pub type SharedPool<'a, R = spin::Mutex<()>> = Shared<crate::BlockPool<'a>, R>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockPool, PoolConfig};

    #[test]
    fn threads_sharing_a_pool_lose_no_update() {
        let pool = BlockPool::with_capacity(PoolConfig::device(0, 16), 64).unwrap();
        let shared: SharedPool<'static> = Shared::new(pool);
        let deferred = core::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (shared, deferred) = (&shared, &deferred);
                s.spawn(move || {
                    for _ in 0..2_000 {
                        let op = |p: &mut BlockPool<'_>| {
                            let b = p.allocate_one().unwrap();
                            p.release(b).unwrap();
                        };
                        if t % 2 == 0 {
                            shared.with(op);
                        } else if shared.try_with(op).is_none() {
                            deferred.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
                            shared.with(op);
                        }
                    }
                });
            }
        });
        let pool = shared.into_inner();
        assert_eq!(pool.stats().allocations, 8_000);
        pool.check_invariants().unwrap();
    }
}
