//! Finding the cgroup v2 hierarchy to attach the sock_ops program to.
//!
//! Its mount point varies (`/sys/fs/cgroup` on unified systems,
//! `/sys/fs/cgroup/unified` on hybrid ones, anything in a container), so it
//! is read from `/proc/mounts` rather than assumed.

use std::path::PathBuf;

use super::EbpfError;

const PROC_MOUNTS: &str = "/proc/mounts";

/// The cgroup v2 mount point of this mount namespace, from `/proc/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf, EbpfError> {
    let text = std::fs::read_to_string(PROC_MOUNTS).map_err(|source| EbpfError::Io {
        what: "reading",
        path: PROC_MOUNTS.into(),
        source,
    })?;
    cgroup2_mount_in(&text).ok_or(EbpfError::NoCgroup2)
}

/// The first `cgroup2` mount point listed in `mounts` (the text of
/// `/proc/mounts`: `device mountpoint fstype options dump pass` per line).
///
/// The first one is taken because later ones are normally bind mounts of
/// the same hierarchy or of a sub-tree; attaching at the first covers every
/// cgroup below it, which is what mux wants. Octal escapes the kernel uses
/// for blanks and backslashes in paths (`\040`, `\011`, `\012`, `\134`) are
/// decoded.
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let (_device, mount_point, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| unescape(mount_point))
    })
}

/// Decodes the `\ooo` escapes of a `/proc/mounts` field; anything that is
/// not a valid three-digit octal escape is kept as it is.
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt as _;

    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0')))
            .and_then(|value| u8::try_from(value).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    // Paths are bytes on Linux: a non-UTF-8 mount point must survive as is.
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_hierarchy() {
        let mounts = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
        assert_eq!(
            cgroup2_mount_in(mounts),
            Some("/sys/fs/cgroup/unified".into())
        );
    }

    #[test]
    fn unified_hierarchy_first_of_several() {
        let mounts = "\
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
cgroup2 /mnt/other cgroup2 rw 0 0
";
        assert_eq!(cgroup2_mount_in(mounts), Some("/sys/fs/cgroup".into()));
    }

    #[test]
    fn none_and_v1_only() {
        assert_eq!(cgroup2_mount_in(""), None);
        assert_eq!(
            cgroup2_mount_in("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ngarbage\n\n"),
            None
        );
        // The device column may say cgroup2 while the type is something else.
        assert_eq!(cgroup2_mount_in("cgroup2 /x tmpfs rw 0 0\n"), None);
    }

    #[test]
    fn escapes_are_decoded() {
        let mounts = "none /run/my\\040cgroups\\134v2 cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount_in(mounts), Some("/run/my cgroups\\v2".into()));
        assert_eq!(unescape("a\\09b\\"), PathBuf::from("a\\09b\\"));
    }
}
