//! Timers that cost a request no registration in tokio's timer wheel. A client's HTTP/1
//! connection has one [`Lazy`] timer, shared by the two deadlines of its requests, which come one
//! at a time: hyper's head-read timeout (through [`ConnTimer`]) and the upstream timeout. Each
//! would otherwise register a timer in tokio's wheel and remove it again for every request: about
//! 400 instructions of the 38,500 a request cost (callgrind, bench/experiments).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A timer for deadlines that mostly move later (the next frame's, the next request's): armed
/// on the first wait, it stays registered at its deadline while later ones are asked for, and is
/// re-armed only when it fires before the deadline asked for then. A wait then costs a look at
/// the timer, not a timer registered and removed again.
#[derive(Default)]
pub struct Lazy {
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker the sleep was last polled with.
    waker: Option<Waker>,
}

impl Lazy {
    /// Ready once `deadline` has passed; wakes the task polling last.
    pub fn poll_until(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(sleep) = &self.sleep
            && sleep.deadline() <= deadline
            && !sleep.is_elapsed()
            && self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
        {
            // Armed no later than asked, not fired, and waking this task already.
            return Poll::Pending;
        }
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                match &mut self.waker {
                    Some(w) => w.clone_from(cx.waker()),
                    None => self.waker = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

/// `from + after`, capped for absurd configured durations instead of overflowing.
pub fn after_from(from: Instant, after: Duration) -> Instant {
    from.checked_add(after)
        .unwrap_or_else(|| from + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// The timer hyper's HTTP/1 server side is given for one connection: its sleeps wait on the
/// connection's [`Lazy`] timer. hyper makes one for each request head it waits for (the
/// head-read timeout), polls it from the connection's task only, and drops it once the head is in.
#[derive(Clone, Default)]
pub struct ConnTimer(Arc<Mutex<Lazy>>);

impl ConnTimer {
    /// [`Lazy::poll_until`] on the connection's timer.
    pub fn poll_until(&self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        self.0.lock().expect("timer lock").poll_until(deadline, cx)
    }
}

impl hyper::rt::Timer for ConnTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(after_from(Instant::now(), duration).into_std())
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(ConnSleep {
            deadline: deadline.into(),
            timer: self.clone(),
        })
    }

    fn now(&self) -> std::time::Instant {
        // tokio's clock, as hyper-util's timer: the same as the deadlines', paused in tests.
        Instant::now().into_std()
    }
}

struct ConnSleep {
    deadline: Instant,
    timer: ConnTimer,
}

impl Future for ConnSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.timer.poll_until(self.deadline, cx)
    }
}

impl hyper::rt::Sleep for ConnSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Default)]
    struct Flag(AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// hyper may ask for any duration; one past the clock's range is far away, not a panic.
    #[tokio::test(start_paused = true)]
    async fn a_conn_timer_sleep_of_any_length_is_made() {
        let mut sleep = hyper::rt::Timer::sleep(&ConnTimer::default(), Duration::MAX);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
    }

    /// A poll from another task than the one before moves the wake-up to it.
    #[tokio::test(start_paused = true)]
    async fn a_lazy_timer_wakes_the_task_that_polled_it_last() {
        let mut timer = Lazy::default();
        let (a, b) = (Arc::new(Flag::default()), Arc::new(Flag::default()));
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        let deadline = Instant::now() + Duration::from_secs(1);
        assert!(
            timer
                .poll_until(deadline, &mut Context::from_waker(&wa))
                .is_pending()
        );
        assert!(
            timer
                .poll_until(deadline, &mut Context::from_waker(&wb))
                .is_pending()
        );
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(b.0.load(Ordering::SeqCst), "the last poller is woken");
        assert!(!a.0.load(Ordering::SeqCst));
        assert!(
            timer
                .poll_until(deadline, &mut Context::from_waker(&wb))
                .is_ready()
        );
    }

    /// Kept across requests, the timer is asked for later deadlines, and now and then for an
    /// earlier one (a reload shortened the timeout): each is kept, to the millisecond.
    #[tokio::test(start_paused = true)]
    async fn a_lazy_timer_keeps_each_deadline_asked_for_earlier_or_later() {
        let mut timer = Lazy::default();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let (t0, s, ms) = (Instant::now(), Duration::from_secs, Duration::from_millis);
        assert!(timer.poll_until(t0 + s(10), &mut cx).is_pending());
        // A later deadline: the timer stays at 10 s, fires early and is re-armed.
        assert!(timer.poll_until(t0 + s(15), &mut cx).is_pending());
        tokio::time::advance(s(11)).await;
        assert!(timer.poll_until(t0 + s(15), &mut cx).is_pending());
        tokio::time::advance(s(4) - ms(2)).await;
        assert!(timer.poll_until(t0 + s(15), &mut cx).is_pending());
        tokio::time::advance(ms(3)).await;
        assert!(timer.poll_until(t0 + s(15), &mut cx).is_ready());
        // Fired; a later deadline again, then an earlier one than that.
        assert!(timer.poll_until(t0 + s(60), &mut cx).is_pending());
        assert!(timer.poll_until(t0 + s(20), &mut cx).is_pending());
        tokio::time::advance(s(5) - ms(2)).await;
        assert!(timer.poll_until(t0 + s(20), &mut cx).is_pending());
        tokio::time::advance(ms(3)).await;
        assert!(timer.poll_until(t0 + s(20), &mut cx).is_ready());
    }
}
