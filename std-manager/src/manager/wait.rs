//! Waiting for backend fences without a busy loop. The HAL's fences can
//! only be polled (no completion callback: CUDA events and Vulkan fences are
//! polled too), and the manager must not depend on one async runtime's timer.
//! So a waiting future polls its fences, and when they are not done it parks
//! with its waker in this timer: one thread per manager (started on first
//! use) that wakes it after an exponential backoff, 5 µs doubling to 1 ms.
//! The executor is free meanwhile; a fence that completes in microseconds
//! costs microseconds, a slow copy costs one wakeup a millisecond.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// First and longest backoff.
const FIRST: Duration = Duration::from_micros(5);
const LONGEST: Duration = Duration::from_millis(1);

/// A registration: fired once its deadline passed.
#[derive(Default)]
struct Slot {
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

#[derive(Default)]
struct State {
    /// (deadline, sequence, slot index into `slots`).
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    slots: std::collections::HashMap<u64, Arc<Slot>>,
    next: u64,
    running: bool,
    stop: bool,
}

#[derive(Default)]
struct TimerInner {
    state: Mutex<State>,
    cv: Condvar,
}

/// The manager's fence timer (see the module docs).
#[derive(Default)]
pub(super) struct Timer {
    inner: Arc<TimerInner>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Timer {
    /// Wakes `slot`'s waker at `deadline`.
    fn register(&self, deadline: Instant, slot: Arc<Slot>) {
        let mut st = lock(&self.inner.state);
        let id = st.next;
        st.next += 1;
        st.due.push(Reverse((deadline, id)));
        st.slots.insert(id, slot);
        if !st.running {
            st.running = true;
            let inner = Arc::clone(&self.inner);
            let spawned = std::thread::Builder::new()
                .name("pagedkv-fences".into())
                .spawn(move || run(&inner));
            if spawned.is_err() {
                // No thread: fire at once (the caller polls again: a spin,
                // but never a hang).
                st.running = false;
                for (_, s) in st.slots.drain() {
                    fire(&s);
                }
                st.due.clear();
                return;
            }
        }
        drop(st);
        self.inner.cv.notify_one();
    }

    /// A future done after `delay` (registered on first poll).
    pub(super) fn sleep(&self, delay: Duration) -> Sleep<'_> {
        Sleep {
            timer: self,
            delay,
            slot: None,
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        lock(&self.inner.state).stop = true;
        self.inner.cv.notify_one();
    }
}

fn fire(s: &Slot) {
    s.fired.store(true, Ordering::Release);
    let w = s.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(w) = w {
        w.wake();
    }
}

fn run(inner: &TimerInner) {
    let mut st = lock(&inner.state);
    loop {
        if st.stop {
            return;
        }
        let now = Instant::now();
        while let Some(&Reverse((at, id))) = st.due.peek() {
            if at > now {
                break;
            }
            st.due.pop();
            if let Some(s) = st.slots.remove(&id) {
                fire(&s);
            }
        }
        st = match st.due.peek() {
            Some(&Reverse((at, _))) => {
                let wait = at.saturating_duration_since(Instant::now());
                inner
                    .cv
                    .wait_timeout(st, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0)
            }
            None => inner.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

/// The `n`-th backoff of a wait (`FIRST`, doubling, at most `LONGEST`).
pub(super) fn backoff(n: u32) -> Duration {
    FIRST
        .saturating_mul(1u32.checked_shl(n.min(16)).unwrap_or(u32::MAX))
        .min(LONGEST)
}

/// See [`Timer::sleep`].
pub(super) struct Sleep<'a> {
    timer: &'a Timer,
    delay: Duration,
    slot: Option<Arc<Slot>>,
}

impl Future for Sleep<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &self.slot {
            Some(s) if s.fired.load(Ordering::Acquire) => Poll::Ready(()),
            Some(s) => {
                *s.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
                // It may have fired between the test and the store.
                if s.fired.load(Ordering::Acquire) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }
            None => {
                let slot = Arc::new(Slot::default());
                *slot.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
                self.timer
                    .register(Instant::now() + self.delay, Arc::clone(&slot));
                self.slot = Some(slot);
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleeping_future_is_woken_not_spun() {
        use std::sync::atomic::AtomicUsize;
        use std::task::Wake;
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let timer = Timer::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(timer.sleep(Duration::from_millis(2)));
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert!(f.as_mut().poll(&mut cx).is_pending(), "not before its time");
        let t0 = Instant::now();
        while count.0.load(Ordering::SeqCst) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(5), "never woken");
            std::thread::sleep(Duration::from_micros(200));
        }
        assert!(f.as_mut().poll(&mut cx).is_ready());
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "one wakeup");
        assert_eq!(backoff(0), FIRST);
        assert_eq!(backoff(40), LONGEST);
    }
}
