//! The `mux` binary: parse the command line, then hand over to the library.

fn main() {}
