//! Process set-up around the server: dropping root for `--user`, the pid file,
//! and the open-file limit.

use std::ffi::{CStr, CString};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("--user {0}: no such user")]
    NoSuchUser(String),
    #[error("--user {user}: {step} failed")]
    Switch {
        user: String,
        step: &'static str,
        source: io::Error,
    },
    #[error("--pidfile {path}")]
    Pidfile { path: PathBuf, source: io::Error },
}

/// Switches the whole process (every thread: glibc's set*id broadcast to
/// them) to `user` and its primary group, dropping supplementary groups.
/// With `keep_net_raw`, the calling thread, and the threads it starts
/// afterwards (they inherit it), keep CAP_NET_RAW and nothing else: what
/// binding a client's address for a transparent route needs.
pub fn drop_to_user(user: &str, keep_net_raw: bool) -> Result<(), PrivilegeError> {
    let (uid, gid) = lookup_user(user)?;
    let fail = |step, source| PrivilegeError::Switch {
        user: user.to_string(),
        step,
        source,
    };
    // Order matters: groups and gid can only be changed while still root.
    // SAFETY: plain syscalls wrappers with valid arguments.
    unsafe {
        if keep_net_raw && libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return Err(fail("prctl(PR_SET_KEEPCAPS)", io::Error::last_os_error()));
        }
        if libc::setgroups(1, &gid) != 0 {
            return Err(fail("setgroups", io::Error::last_os_error()));
        }
        if libc::setgid(gid) != 0 {
            return Err(fail("setgid", io::Error::last_os_error()));
        }
        if libc::setuid(uid) != 0 {
            return Err(fail("setuid", io::Error::last_os_error()));
        }
    }
    if keep_net_raw {
        keep_only_net_raw().map_err(|e| fail("capset", e))?;
    }
    Ok(())
}

/// Narrows this thread's capabilities to CAP_NET_RAW, permitted and
/// effective (setuid kept them permitted, cleared the effective set).
fn keep_only_net_raw() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // linux/capability.h.
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_RAW: u32 = 13;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    data[0].effective = 1 << CAP_NET_RAW;
    data[0].permitted = 1 << CAP_NET_RAW;
    // SAFETY: capset reads a version 3 header and two data words.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; later set*id calls need not keep anything.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    Ok(())
}

fn lookup_user(user: &str) -> Result<(libc::uid_t, libc::gid_t), PrivilegeError> {
    let name = CString::new(user).map_err(|_| PrivilegeError::NoSuchUser(user.to_string()))?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; getpwnam_r writes strings
    // into `buf`, which outlives our use of `pwd`.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(PrivilegeError::NoSuchUser(user.to_string()));
    }
    debug_assert!(!unsafe { CStr::from_ptr(pwd.pw_name) }.to_bytes().is_empty());
    Ok((pwd.pw_uid, pwd.pw_gid))
}

/// A pid file that removes itself when dropped (best effort: after dropping
/// root the directory may no longer be writable, as with sslh).
pub struct Pidfile {
    path: PathBuf,
}

impl Pidfile {
    pub fn create(path: &Path) -> Result<Pidfile, PrivilegeError> {
        std::fs::write(path, format!("{}\n", std::process::id())).map_err(|source| {
            PrivilegeError::Pidfile {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(Pidfile {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Entries of the descriptor table [`presize_fd_table`] asks for at most:
/// 10,000 spliced connections' worth (six descriptors each). 512 KiB of
/// kernel memory.
const FD_TABLE_AT_START: u64 = 1 << 16;

/// Grows this process's descriptor table to `min(limit, 65536)` entries
/// now, and gives that size. Call it while the process has one thread.
///
/// The kernel grows the table by doubling (64, 128, 256, ...) as
/// descriptors are opened, and once the table is shared by several threads
/// each doubling waits for an RCU grace period (`expand_fdtable`): about
/// 15 ms here, during which every worker that opens a socket or pipe waits
/// too. A burst of clients just after start (each spliced pair takes two
/// sockets and four pipe ends) met four of them in a row. With one thread
/// there is no wait, and a table never shrinks.
pub fn presize_fd_table(limit: u64) -> io::Result<u64> {
    let entries = limit.min(FD_TABLE_AT_START);
    let Some(highest) = entries.checked_sub(1) else {
        return Ok(0);
    };
    let any = std::fs::File::open("/")?;
    // Asking for the lowest free descriptor at or above `highest` makes the
    // kernel size the table to hold it; closing it leaves the table as is.
    // `highest` < FD_TABLE_AT_START, so it fits.
    drop(rustix::io::fcntl_dupfd_cloexec(&any, highest as i32)?);
    Ok(entries)
}

/// Each relayed pair holds two sockets and up to four pipe ends: the usual
/// soft limit of 1024 would cap mux at ~170 connections. Raise the soft limit
/// to the hard one, which needs no privilege.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}
