//! The shard's timers: the deadlines and waits of every connection on a shard, kept in one
//! heap and served by one runtime timer.
//!
//! monoio's own `Sleep` is 640 bytes with 128-byte alignment (cache-padded for threads this
//! runtime never has). A request held one for its deadline and every future around it was
//! padded to match: a connection's task carried ~5.9 KiB, most of it for timers. A [`Timer`]
//! is 16 bytes; its state (instant, waker) lives in the shard's table.
//!
//! A timer that is reset or dropped leaves a stale item in the heap, skipped when it comes
//! up; the heap is rebuilt from the live timers when stale items outnumber them.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use monoio::time::Instant;

/// Every timer of one shard.
#[derive(Default)]
pub struct Timers {
    inner: RefCell<Table>,
}

#[derive(Default)]
struct Table {
    entries: Vec<Entry>,
    free: Vec<u32>,
    live: usize,
    /// (when, entry, generation); an item whose generation is not its entry's is stale.
    heap: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    /// When the driver's runtime timer fires (`None`: it waits for a first timer).
    armed: Option<Instant>,
    /// A timer due before `armed` came: the driver must set its timer again.
    kicked: bool,
    driver: Option<Waker>,
}

struct Entry {
    when: Instant,
    generation: u32,
    fired: bool,
    waker: Option<Waker>,
}

/// One timer: a deadline that can be moved, and a future that completes once it passed.
pub struct Timer<'a> {
    timers: &'a Timers,
    key: u32,
}

impl Timers {
    /// A timer that fires at `when` (at once if it has passed).
    pub fn at(&self, when: Instant) -> Timer<'_> {
        let mut t = self.inner.borrow_mut();
        let key = match t.free.pop() {
            Some(k) => k,
            None => {
                t.entries.push(Entry {
                    when,
                    generation: 0,
                    fired: false,
                    waker: None,
                });
                (t.entries.len() - 1) as u32
            }
        };
        t.live += 1;
        t.schedule(key, when);
        Timer { timers: self, key }
    }

    /// Runs `f` until `deadline`: `Err(())` if the deadline came first.
    pub fn timeout_at<F: Future>(&self, deadline: Instant, f: F) -> Timeout<'_, F> {
        Timeout {
            timer: self.at(deadline),
            f,
        }
    }

    /// Timers set and not yet dropped.
    pub fn len(&self) -> usize {
        self.inner.borrow().live
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shard's one runtime timer: fires what is due, then sleeps until the next.
    /// Spawned once per shard; never returns.
    pub async fn drive(self: Rc<Self>) {
        loop {
            let next = {
                let mut t = self.inner.borrow_mut();
                let next = t.fire_due(Instant::now());
                t.armed = next;
                next
            };
            let mut sleep = next.map(|at| Box::pin(monoio::time::sleep_until(at)));
            poll_fn(|cx| {
                if let Some(s) = sleep.as_mut() {
                    if s.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(());
                    }
                }
                let mut t = self.inner.borrow_mut();
                if std::mem::take(&mut t.kicked) {
                    return Poll::Ready(());
                }
                match &t.driver {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => t.driver = Some(cx.waker().clone()),
                }
                Poll::Pending
            })
            .await;
        }
    }
}

impl Table {
    fn schedule(&mut self, key: u32, when: Instant) {
        let e = &mut self.entries[key as usize];
        e.when = when;
        e.fired = false;
        e.generation = e.generation.wrapping_add(1);
        let generation = e.generation;
        self.heap.push(Reverse((when, key, generation)));
        if self.armed.is_none_or(|a| when < a) {
            self.kicked = true;
            if let Some(w) = self.driver.take() {
                w.wake();
            }
        }
        if self.heap.len() > 2 * self.live + 1024 {
            self.compact();
        }
    }

    fn remove(&mut self, key: u32) {
        let e = &mut self.entries[key as usize];
        e.generation = e.generation.wrapping_add(1);
        e.waker = None;
        self.live -= 1;
        self.free.push(key);
    }

    fn is_current(&self, key: u32, generation: u32) -> bool {
        self.entries[key as usize].generation == generation
    }

    /// Fires every timer due by `now`; returns when the next one is due.
    fn fire_due(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&Reverse((when, key, generation))) = self.heap.peek() {
            if !self.is_current(key, generation) {
                self.heap.pop();
                continue;
            }
            if when > now {
                return Some(when);
            }
            self.heap.pop();
            let e = &mut self.entries[key as usize];
            e.fired = true;
            if let Some(w) = e.waker.take() {
                w.wake();
            }
        }
        None
    }

    /// Drops the stale items: the heap again holds one item per live, unfired timer.
    fn compact(&mut self) {
        let heap = std::mem::take(&mut self.heap);
        self.heap = heap
            .into_iter()
            .filter(|Reverse((_, key, generation))| self.is_current(*key, *generation))
            .collect();
    }
}

/// `f` until a deadline (`Timers::timeout_at`). A future of its own rather than an
/// `async fn`, which would hold `f` twice (its argument, then pinned) in every task
/// waiting on it.
pub struct Timeout<'a, F> {
    timer: Timer<'a>,
    f: F,
}

impl<F: Future> Future for Timeout<'_, F> {
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `f` is never moved out of the pinned struct; the timer is Unpin.
        let this = unsafe { self.get_unchecked_mut() };
        if let Poll::Ready(v) = unsafe { Pin::new_unchecked(&mut this.f) }.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        Pin::new(&mut this.timer).poll(cx).map(Err)
    }
}

impl Timer<'_> {
    /// Moves the deadline (earlier or later); a timer that fired is set again.
    pub fn reset(&mut self, when: Instant) {
        self.timers.inner.borrow_mut().schedule(self.key, when);
    }

    pub fn deadline(&self) -> Instant {
        self.timers.inner.borrow().entries[self.key as usize].when
    }
}

impl Future for Timer<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut t = self.timers.inner.borrow_mut();
        let e = &mut t.entries[self.key as usize];
        if e.fired {
            return Poll::Ready(());
        }
        match &e.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => e.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.timers.inner.borrow_mut().remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::time::Duration;

    fn run<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// A shard's timers with their driver running (inside `run`).
    fn driven() -> Rc<Timers> {
        let timers = Rc::new(Timers::default());
        monoio::spawn(timers.clone().drive());
        timers
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_timer_fires_at_its_deadline_not_before() {
        run(async {
            let timers = driven();
            let start = Instant::now();
            timers.at(start + ms(30)).await;
            let took = start.elapsed();
            assert!(took >= ms(30), "{took:?}");
            assert!(timers.is_empty());
        });
    }

    #[test]
    fn timers_fire_in_deadline_order_whatever_the_order_they_were_set() {
        run(async {
            let timers = driven();
            let order = Rc::new(RefCell::new(Vec::new()));
            let start = Instant::now();
            let mut tasks = Vec::new();
            for (name, after) in [("late", 60), ("early", 10), ("middle", 30)] {
                let (t, o) = (timers.clone(), order.clone());
                tasks.push(monoio::spawn(async move {
                    t.at(start + ms(after)).await;
                    o.borrow_mut().push(name);
                }));
            }
            for t in tasks {
                t.await;
            }
            assert_eq!(*order.borrow(), ["early", "middle", "late"]);
        });
    }

    #[test]
    fn a_timer_moved_earlier_fires_early_and_one_moved_later_does_not_fire_at_the_old_time() {
        run(async {
            let timers = driven();
            let start = Instant::now();
            // The driver sleeps until the first timer (10 s); moving it to 20 ms must wake it.
            let mut t = timers.at(start + Duration::from_secs(10));
            monoio::time::sleep(ms(5)).await;
            t.reset(start + ms(20));
            (&mut t).await;
            assert!(start.elapsed() < Duration::from_secs(5));
            // Fired, then set again later: it waits again.
            t.reset(Instant::now() + ms(40));
            let moved_at = Instant::now();
            let fired = Cell::new(false);
            let probe = timers.timeout_at(Instant::now() + ms(15), async {
                (&mut t).await;
                fired.set(true);
            });
            assert_eq!(probe.await, Err(()));
            assert!(!fired.get());
            (&mut t).await;
            assert!(moved_at.elapsed() >= ms(40));
        });
    }

    #[test]
    fn timeout_at_returns_the_value_when_the_work_wins_and_err_when_the_deadline_does() {
        run(async {
            let timers = driven();
            let now = Instant::now();
            assert_eq!(timers.timeout_at(now + ms(50), async { 7 }).await, Ok(7));
            let slow = monoio::time::sleep(Duration::from_secs(5));
            assert_eq!(timers.timeout_at(now + ms(10), slow).await, Err(()));
            assert!(timers.is_empty(), "both timers were dropped");
        });
    }

    #[test]
    fn dropped_and_reset_timers_do_not_pile_up_in_the_heap() {
        run(async {
            let timers = driven();
            let far = Instant::now() + Duration::from_secs(3600);
            let mut kept = timers.at(far);
            for i in 0..100_000u64 {
                drop(timers.at(far + ms(i)));
                kept.reset(far + ms(i));
            }
            let heap = timers.inner.borrow().heap.len();
            assert!(heap <= 2 * timers.len() + 1024, "{heap}");
            assert_eq!(timers.len(), 1);
            assert_eq!(kept.deadline(), far + ms(99_999));
        });
    }
}
