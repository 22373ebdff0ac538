//! Scheduler hint for mux's worker threads: short time slices, so that a
//! worker woken by a client's bytes runs soon even on a box whose CPUs are
//! busy with other work (a model server, the load generator of a benchmark).

use std::io;

/// The slice a worker asks for: the shortest the kernel accepts. A worker
/// runs for tens of microseconds per wake-up; a shorter slice gives its
/// wake-ups an earlier deadline, so the fair scheduler (EEVDF) lets them
/// preempt a task that has been running, where with the default slice they
/// could wait for that task's slice to end, up to two 4 ms ticks measured
/// here (`perf sched latency`). It does not change mux's share of CPU time,
/// which the thread's weight (nice value) sets.
pub const WORKER_SLICE_NS: u64 = 100_000;

/// `struct sched_attr` as of Linux 4.16 (`SCHED_ATTR_SIZE_VER1`).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    /// For `SCHED_OTHER`, the requested slice (Linux 6.12 and later; older
    /// kernels ignore it).
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Asks for [`WORKER_SLICE_NS`] slices for the calling thread, keeping its
/// policy and nice value. A thread an administrator put in another policy
/// than the normal or batch one (idle, real-time) is left as it is.
pub fn request_short_slice() -> io::Result<()> {
    // SAFETY: pid 0 is the calling thread; no memory is passed.
    let current = unsafe { libc::sched_getscheduler(0) };
    if current < 0 {
        return Err(io::Error::last_os_error());
    }
    let reset_on_fork = current & libc::SCHED_RESET_ON_FORK != 0;
    let policy = current & !libc::SCHED_RESET_ON_FORK;
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        return Ok(());
    }
    let attr = SchedAttr {
        size: size_of::<SchedAttr>() as u32,
        policy: policy as u32,
        // SCHED_FLAG_RESET_ON_FORK, kept as it was.
        flags: u64::from(reset_on_fork),
        // SAFETY: getpriority on the calling thread has no memory effects.
        nice: unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) },
        priority: 0,
        runtime: WORKER_SLICE_NS,
        deadline: 0,
        period: 0,
        util_min: 0,
        util_max: 0,
    };
    // SAFETY: pid 0 is the calling thread, `attr` is a valid, fully
    // initialised sched_attr of the size it declares; the call takes no
    // flags of its own.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
