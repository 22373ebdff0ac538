//! Fuzzes the parser of the tunnel's opening requests (a client's CONNECT,
//! an agent's hello), which anyone who reaches the shared port can send: no
//! input may panic it, and where the bytes happen to be cut between reads
//! must not change what mux answers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mux::tunnel::request::{Parsed, credentials, parse};
use mux_fuzz::split_points;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    match &whole {
        Parsed::Connect(r) => assert!(r.head_len <= data.len()),
        Parsed::Agent(a) => {
            assert!(a.head_len <= data.len());
            // What the registry is keyed by: never an empty or padded name.
            assert!(!a.names.is_empty());
            assert!(a.names.iter().all(|n| !n.is_empty() && n.trim() == n));
        }
        _ => {}
    }
    // mux answers at the first verdict other than Incomplete, so a verdict on
    // a prefix must be the one the whole input gets.
    for end in split_points(data) {
        match parse(&data[..end]) {
            Parsed::Incomplete => {}
            Parsed::Malformed(why) => assert!(
                matches!(whole, Parsed::Malformed(_)),
                "{end}-byte prefix malformed ({why}), whole is {whole:?}"
            ),
            part => assert_eq!(part, whole, "{end}-byte prefix vs whole"),
        }
    }
    // Header values reach it as they came.
    let _ = credentials(data);
});
