//! Types shared by user space and the eBPF programs.
#![no_std]
