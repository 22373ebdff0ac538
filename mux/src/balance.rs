//! Keeps the workers' shares of open connections even. SO_REUSEPORT spreads
//! new connections by a hash of their addresses, which often leaves one
//! worker with a third more than another (64 keep-alive clients split
//! 26/38 here), and that worker's requests wait longer: the HTTP layer's
//! p99 followed the busier worker. A worker holding more than its share
//! hands a new connection to the least loaded one instead.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

/// A worker that could not start counts as full, so that nothing is handed
/// to it twice.
const GONE: usize = usize::MAX / 2;

pub struct Balance {
    open: Vec<AtomicUsize>,
    inboxes: Vec<mpsc::UnboundedSender<Handoff>>,
}

/// A connection accepted by one worker for another to serve.
pub struct Handoff {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub slot: Slot,
}

/// One open connection counted against its worker, until dropped.
pub struct Slot {
    balance: Arc<Balance>,
    worker: usize,
}

impl Slot {
    pub fn worker(&self) -> usize {
        self.worker
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.balance.open[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balance {
    /// For `workers` workers; worker `w` takes the connections handed to it
    /// from the `w`th receiver.
    pub fn new(workers: usize) -> (Arc<Balance>, Vec<mpsc::UnboundedReceiver<Handoff>>) {
        let (inboxes, receivers) = (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let balance = Balance {
            open: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            inboxes,
        };
        (Arc::new(balance), receivers)
    }

    /// Where a connection that worker `me` accepted should run: on `me`
    /// unless it has more than one connection over the least loaded worker.
    pub fn place(self: &Arc<Self>, me: usize) -> Slot {
        let mine = self.open[me].load(Ordering::Relaxed);
        let (least, fewest) = self
            .open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .enumerate()
            .min_by_key(|&(_, n)| n)
            .unwrap_or((me, mine));
        let worker = if mine > fewest + 1 { least } else { me };
        self.count(worker)
    }

    /// Counts a connection on `worker`.
    pub fn count(self: &Arc<Self>, worker: usize) -> Slot {
        self.open[worker].fetch_add(1, Ordering::Relaxed);
        Slot {
            balance: self.clone(),
            worker,
        }
    }

    /// Gives `handoff` to its slot's worker; back if that worker is gone.
    pub fn hand_off(&self, handoff: Handoff) -> Result<(), Handoff> {
        let worker = handoff.slot.worker;
        self.inboxes[worker].send(handoff).map_err(|e| {
            self.open[worker].store(GONE, Ordering::Relaxed);
            e.0
        })
    }

    /// Open connections per worker.
    #[cfg(test)]
    fn shares(&self) -> Vec<usize> {
        self.open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_accepted_by_one_worker_spread_over_all() {
        let (balance, _inboxes) = Balance::new(3);
        let slots: Vec<Slot> = (0..30).map(|_| balance.place(0)).collect();
        let shares = balance.shares();
        assert!(shares.iter().all(|&n| (9..=11).contains(&n)), "{shares:?}");
        drop(slots);
        assert_eq!(balance.shares(), vec![0, 0, 0]);
    }

    #[test]
    fn a_worker_within_one_of_the_least_keeps_its_connection() {
        let (balance, _inboxes) = Balance::new(2);
        let _a = balance.count(1);
        let kept = balance.place(0);
        assert_eq!(kept.worker(), 0);
        let _b = balance.place(0);
        assert_eq!(balance.shares(), vec![2, 1]);
        // 2 against 1: still within one, so it stays; 3 against 1 would not.
        assert_eq!(balance.place(0).worker(), 0);
        let _c = balance.count(0);
        assert_eq!(balance.place(0).worker(), 1);
    }

    #[test]
    fn a_worker_that_is_gone_gets_nothing_more() {
        let (balance, inboxes) = Balance::new(2);
        drop(inboxes);
        let _held: Vec<Slot> = (0..3).map(|_| balance.count(0)).collect();
        let slot = balance.place(0);
        assert_eq!(slot.worker(), 1);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let peer = stream.local_addr().unwrap();
        let back = balance.hand_off(Handoff { stream, peer, slot });
        assert!(back.is_err());
        drop(back);
        assert_eq!(balance.place(0).worker(), 0);
    }
}
