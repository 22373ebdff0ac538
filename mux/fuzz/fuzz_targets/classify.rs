//! Fuzzes the protocol probes: no input may panic them, and no way of
//! splitting an input into reads may change the verdict.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mux::classify::{Probe, Protocol, probe};
use mux_fuzz::split_points;

fuzz_target!(|data: &[u8]| {
    for protocol in Protocol::ALL {
        let whole = probe(protocol, data, false);
        let closed = probe(protocol, data, true);
        // Once the client is done, a probe must decide; and where it had
        // decided already, knowing that no more bytes come changes nothing.
        assert_ne!(closed, Probe::NeedMore, "{protocol} with last");
        if whole != Probe::NeedMore {
            assert_eq!(closed, whole, "{protocol} with and without last");
        }
        // A prefix that already says NoMatch or Match has said what the whole
        // says: a router acting on the prefix's verdict would not regret it.
        for end in split_points(data) {
            let part = probe(protocol, &data[..end], false);
            if part != Probe::NeedMore {
                assert_eq!(part, whole, "{protocol}: {end}-byte prefix vs whole");
            }
        }
    }
});
