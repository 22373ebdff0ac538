//! Connection limits: global, per source address and per route. The counts
//! live for the whole process (a reload changes the limits, not the count
//! of connections already open); each admitted connection holds a guard
//! that gives its places back when it ends, however it ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};

/// The limits of one configuration; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Client connections open at once, classified or not.
    pub max_connections: Option<usize>,
    /// Client connections open at once from one address.
    pub max_per_source: Option<usize>,
}

/// Which limit a connection ran into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exceeded {
    Global(usize),
    Source(usize),
    Route(String, usize),
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exceeded::Global(n) => write!(f, "max_connections = {n} reached"),
            Exceeded::Source(n) => {
                write!(
                    f,
                    "max_connections_per_source = {n} reached for this address"
                )
            }
            Exceeded::Route(route, n) => {
                write!(f, "route `{route}`: max_connections = {n} reached")
            }
        }
    }
}

struct Counts {
    open: AtomicUsize,
    by_source: Mutex<HashMap<IpAddr, usize>>,
    by_route: Mutex<HashMap<String, usize>>,
}

static COUNTS: LazyLock<Counts> = LazyLock::new(|| Counts {
    open: AtomicUsize::new(0),
    by_source: Mutex::new(HashMap::new()),
    by_route: Mutex::new(HashMap::new()),
});

/// Client connections open now.
pub fn open() -> usize {
    COUNTS.open.load(Ordering::Relaxed)
}

/// A connection's place in the global and per-source counts.
pub struct Admission {
    source: IpAddr,
    /// The counts as this connection arrived, itself included.
    open: usize,
    from_source: usize,
}

impl Admission {
    /// Counts a newly accepted connection (always: the decision comes once
    /// the protocol is known, so that the refusal can be the protocol's own).
    pub fn new(source: IpAddr) -> Admission {
        let open = COUNTS.open.fetch_add(1, Ordering::Relaxed) + 1;
        let mut by_source = COUNTS.by_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = by_source.entry(source).or_insert(0);
        *n += 1;
        Admission {
            source,
            open,
            from_source: *n,
        }
    }

    /// Whether this connection is over a limit.
    pub fn check(&self, limits: &Limits) -> Result<(), Exceeded> {
        if let Some(max) = limits.max_connections.filter(|&m| self.open > m) {
            return Err(Exceeded::Global(max));
        }
        if let Some(max) = limits.max_per_source.filter(|&m| self.from_source > m) {
            return Err(Exceeded::Source(max));
        }
        Ok(())
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        COUNTS.open.fetch_sub(1, Ordering::Relaxed);
        let mut by_source = COUNTS.by_source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// A connection's place in its route's count.
pub struct RouteSlot {
    route: String,
}

impl RouteSlot {
    /// Takes a place on `route` if it has one under `max`.
    pub fn take(route: &str, max: Option<usize>) -> Result<RouteSlot, Exceeded> {
        let mut by_route = COUNTS.by_route.lock().unwrap_or_else(|p| p.into_inner());
        let n = by_route.entry(route.to_string()).or_insert(0);
        if let Some(max) = max.filter(|&m| *n >= m) {
            return Err(Exceeded::Route(route.to_string(), max));
        }
        *n += 1;
        Ok(RouteSlot {
            route: route.to_string(),
        })
    }
}

impl Drop for RouteSlot {
    fn drop(&mut self) {
        let mut by_route = COUNTS.by_route.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_route.get_mut(&self.route) {
            *n -= 1;
            if *n == 0 {
                by_route.remove(&self.route);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The counts are process-wide: each test uses its own addresses and
    // route names so that tests running in parallel do not meet.
    #[test]
    fn per_source_limit_counts_each_address_alone() {
        let limits = Limits {
            max_connections: None,
            max_per_source: Some(2),
        };
        let a: IpAddr = "192.0.2.10".parse().unwrap();
        let b: IpAddr = "192.0.2.11".parse().unwrap();
        let a1 = Admission::new(a);
        let a2 = Admission::new(a);
        let a3 = Admission::new(a);
        let b1 = Admission::new(b);
        assert_eq!(a1.check(&limits), Ok(()));
        assert_eq!(a2.check(&limits), Ok(()));
        assert_eq!(a3.check(&limits), Err(Exceeded::Source(2)));
        assert_eq!(b1.check(&limits), Ok(()));
        drop((a1, a2, a3));
        assert_eq!(Admission::new(a).check(&limits), Ok(()));
    }

    #[test]
    fn route_slots_are_given_back() {
        let one = RouteSlot::take("limits-test-route", Some(1)).unwrap();
        assert_eq!(
            RouteSlot::take("limits-test-route", Some(1)).err(),
            Some(Exceeded::Route("limits-test-route".into(), 1))
        );
        drop(one);
        assert!(RouteSlot::take("limits-test-route", Some(1)).is_ok());
        assert!(RouteSlot::take("limits-test-unlimited", None).is_ok());
    }
}
