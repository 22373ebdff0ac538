//! Deadlines for one HTTP/1 connection that share one tokio timer, re-armed
//! only when it fires early. A keep-alive connection sets two deadlines per
//! request (the next request's headers, the backend's answer); a timer of
//! its own each time costs a timer-wheel insert and removal, and now and
//! then a wake-up of the whole runtime, which measured here as a few
//! percent of the HTTP layer's requests per second.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

/// One connection's timer. It serves one waiting deadline at a time, as an
/// HTTP/1 connection has: a later deadline waits on the timer armed for an
/// earlier one, and re-arms it for itself when it fires.
#[derive(Clone)]
pub struct Deadlines {
    timer: Arc<Mutex<Pin<Box<tokio::time::Sleep>>>>,
}

impl Deadlines {
    pub fn new() -> Deadlines {
        // Armed in the past: the first deadline re-arms it.
        let timer = Box::pin(tokio::time::sleep_until(Instant::now()));
        Deadlines {
            timer: Arc::new(Mutex::new(timer)),
        }
    }

    /// Completes at `deadline`.
    pub fn until(&self, deadline: Instant) -> Deadline {
        Deadline {
            deadline,
            timer: self.timer.clone(),
        }
    }

    /// `future`'s output, or `None` if it takes longer than `limit`.
    pub fn within<F: Future>(&self, limit: Duration, future: F) -> Within<F> {
        Within {
            future,
            deadline: self.until(Instant::now() + limit),
        }
    }
}

pin_project_lite::pin_project! {
    /// A future bounded by a deadline (as small as the two, unlike a
    /// `select!`).
    pub struct Within<F> {
        #[pin]
        future: F,
        deadline: Deadline,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.future.poll(cx) {
            return Poll::Ready(Some(out));
        }
        Pin::new(this.deadline).poll(cx).map(|()| None)
    }
}

/// A deadline on a connection's shared timer.
pub struct Deadline {
    deadline: Instant,
    timer: Arc<Mutex<Pin<Box<tokio::time::Sleep>>>>,
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        let Ok(mut timer) = self.timer.lock() else {
            // Only a panic while holding the lock poisons it; end the wait
            // rather than hang.
            return Poll::Ready(());
        };
        loop {
            // A timer that already fired, or is armed for later than this
            // deadline, is armed for this one. Otherwise the clock need not
            // be read: the timer is due first.
            if timer.is_elapsed() || timer.deadline() > deadline {
                if Instant::now() >= deadline {
                    return Poll::Ready(());
                }
                timer.as_mut().reset(deadline);
            }
            match timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if timer.deadline() >= deadline => return Poll::Ready(()),
                // It fired for an earlier deadline: this one is re-armed.
                Poll::Ready(()) => continue,
            }
        }
    }
}

impl hyper::rt::Sleep for Deadline {}

impl hyper::rt::Timer for Deadlines {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.until(Instant::now() + duration))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.until(Instant::from_std(deadline)))
    }

    // The same clock as the deadlines', which tests may pause.
    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_completes_at_its_time_not_at_an_earlier_ones() {
        let deadlines = Deadlines::new();
        let start = Instant::now();
        // The first deadline arms the timer for 1 s; the second waits on it,
        // then re-arms it for itself.
        let first = deadlines.until(start + Duration::from_secs(1));
        drop(tokio::time::timeout(Duration::from_millis(10), first).await);
        deadlines.until(start + Duration::from_secs(3)).await;
        assert!(start.elapsed() >= Duration::from_secs(3));
        assert!(start.elapsed() < Duration::from_millis(3100));
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_pulls_the_timer_in() {
        let deadlines = Deadlines::new();
        let start = Instant::now();
        let late = deadlines.until(start + Duration::from_secs(60));
        drop(tokio::time::timeout(Duration::from_millis(10), late).await);
        deadlines.until(start + Duration::from_secs(2)).await;
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(2) && took < Duration::from_millis(2100));
    }

    #[tokio::test(start_paused = true)]
    async fn within_gives_the_output_or_none() {
        let deadlines = Deadlines::new();
        let quick = deadlines.within(Duration::from_secs(5), async { 7 }).await;
        assert_eq!(quick, Some(7));
        let slow = deadlines
            .within(
                Duration::from_secs(5),
                tokio::time::sleep(Duration::from_secs(10)),
            )
            .await;
        assert_eq!(slow, None);
        // The timer is reused for the next request's deadline.
        let again = deadlines.within(Duration::from_secs(1), async { 8 }).await;
        assert_eq!(again, Some(8));
    }
}
