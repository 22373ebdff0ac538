//! Scheduler settings for mux's worker threads: short time slices, so that a
//! worker woken by a client's bytes runs soon even on a box whose CPUs are
//! busy with other work (a model server, the load generator of a benchmark),
//! and a CPU of its own for each worker.

use std::io;
use std::sync::OnceLock;

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

/// The CPUs the process may run on, as it was started (by taskset, a
/// systemd `CPUAffinity=` or a cpuset), read before any worker narrows its
/// own set.
static ALLOWED: OnceLock<libc::cpu_set_t> = OnceLock::new();

/// One CPU per worker, in order, when the process may run on exactly
/// `workers` CPUs; `None` otherwise (a CPU quota smaller than the set, say:
/// which of the CPUs have room is then the scheduler's to know).
///
/// Why pin at all: with both of this machine's CPUs busy (the load
/// generator, the backends), the scheduler balances by load, not by
/// thread, and often left both workers on one CPU. There they take turns a
/// 4 ms tick at a time while each one's requests wait out the other's turn:
/// `perf sched timehist` showed the two alternating with 4 ms runs, and 2 to
/// 5% of HTTP requests took 4.5 ms instead of 1 (p99 4.5 ms). Pinned, p99
/// was 2.1 ms, as HAProxy's.
pub fn cpus_for_workers(workers: usize) -> io::Result<Option<Vec<usize>>> {
    let allowed = match ALLOWED.get() {
        Some(set) => *set,
        None => {
            // SAFETY: an all-zero cpu_set_t is a valid empty set.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: pid 0 is the calling thread; the kernel writes at
            // most the size given into `set`, which outlives the call.
            let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            *ALLOWED.get_or_init(|| set)
        }
    };
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `allowed` is a valid set and the index is below its size.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &allowed) })
        .collect();
    Ok((cpus.len() == workers).then_some(cpus))
}

/// Keeps the calling thread (a worker) on `cpu` only.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET bounds-checks the index against the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set_affinity(&set)
}

/// Gives the calling thread back every CPU the process started with: for
/// threads that a worker's thread spawns (tokio's blocking pool), which
/// would otherwise inherit the worker's single CPU.
pub fn unpin() {
    if let Some(set) = ALLOWED.get() {
        // Best effort: such a thread works on one CPU too, only slower.
        let _ = set_affinity(set);
    }
}

fn set_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: pid 0 is the calling thread; `set` is a valid set of the
    // size given, only read.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
