//! The lock file's place in the file system: the directory and owner checks, and what a live
//! process does when `<listening>.lock` is removed or replaced under it (an operator, a tmp
//! cleaner).
//!
//! The locks live on an inode, not on a path: once the file at the path is another inode,
//! a process that opens it can lock a worker id or the broker byte that a live process holds
//! in the old one. Three rules keep two live processes from holding one id, and a second
//! broker from starting on a fresh region (a process that creates the lock file while a
//! broker serves cannot tell a removed lock file from a broker that never had one, so the
//! broker decides):
//! * every live process compares the path's device and inode with its open file's every
//!   [`CHECK_INTERVAL`](super::election::CHECK_INTERVAL) (and before running for election).
//!   On a difference it opens the file at the path (creating it if missing) and takes its
//!   locks there too (slot, region, broker), keeping the old file open so that peers that
//!   have not moved yet still see them. From then on a new process finds the live ids and
//!   the broker byte taken. If another process holds our slot there already, we stay on our
//!   file and report it (that process is refused by the broker: next rule);
//! * HELLO carries the device and inode of the worker's lock file, and a broker refuses a
//!   worker whose file is not its own.

use std::io;
use std::path::Path;

use super::Control;
use super::election::{LockFile, lock_path};
use crate::error::{Error, Result};
use crate::sys;

/// Create the socket's directory (mode 0700) if missing; refuse one that belongs to a uid
/// that is neither ours, root's nor allowed, or that every user may write without the
/// sticky bit (anyone could replace the lock file or the socket in it).
pub(super) fn check_dir(path: &Path, allowed_uids: &[u32]) -> Result<()> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else { return Ok(()) };
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io("creating the directory of the listening socket", e))?;
    }
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).map_err(|e| Error::io("inspecting the directory of the listening socket", e))?;
    let refuse = |why: String| {
        Err(Error::io(
            "checking the directory of the listening socket",
            io::Error::new(io::ErrorKind::PermissionDenied, why),
        ))
    };
    if m.uid() != sys::euid() && m.uid() != 0 && !allowed_uids.contains(&m.uid()) {
        return refuse(format!(
            "{} belongs to uid {}, not to this user, root or an allowed uid",
            dir.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o002 != 0 && m.mode() & 0o1000 == 0 {
        return refuse(format!(
            "{} is writable by every user and not sticky (mode {:o})",
            dir.display(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

impl Control {
    /// Is the file at the lock path another one than ours (removed or replaced)?
    pub(super) fn lock_replaced(&self) -> bool {
        !sys::lstat_id(&lock_path(&self.path)).is_ok_and(|id| id.same_file(&self.lock_id))
    }

    /// Compare the lock file at the path with ours; on a difference, take our locks in the
    /// file at the path (see the module docs).
    pub(super) fn check_lock_file(&mut self) {
        if !self.lock_replaced() {
            return;
        }
        let path = lock_path(&self.path);
        let warn_once = |c: &mut Control, msg: String| {
            if !std::mem::replace(&mut c.lock_warned, true) {
                tracing::error!("{msg}");
            }
        };
        let (new, id, _) = match LockFile::open(&path, &self.allowed_uids) {
            Ok(f) => f,
            Err(e) => {
                warn_once(
                    self,
                    format!("the lock file {} was removed or replaced and cannot be reopened: {e}", path.display()),
                );
                return;
            }
        };
        match new.try_slot(self.slot) {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                warn_once(
                    self,
                    format!(
                        "the lock file {} was replaced and another process holds worker slot {} in the new one; \
                         staying on ours (the broker refuses that process)",
                        path.display(),
                        self.slot
                    ),
                );
                return;
            }
        }
        if self.election.holds_region && !new.try_region(self.slot).unwrap_or(false) {
            tracing::warn!(slot = self.slot, "cannot take the region lock byte in the new lock file");
        }
        if self.is_broker() && self.election.holds_broker_byte && !new.try_broker() {
            tracing::warn!(slot = self.slot, "cannot take the broker lock byte in the new lock file");
        }
        tracing::warn!(slot = self.slot, path = %path.display(), "the lock file was removed or replaced; took our locks in the new one");
        let old = std::mem::replace(&mut self.lock, new);
        self.retired.push(old);
        self.lock_id = id;
        self.lock_warned = false;
    }
}

/// Remove the control socket at `path` and its lock file once no live process uses them
/// (a finished generation, see `Options::generation`). `Ok(false)`, touching nothing, while
/// any process holds a lock in the file. While this runs it holds every lock of the file,
/// so a process starting on the same path at that moment is refused as `WidInUse`.
pub(crate) fn remove_files(path: &Path, allowed_uids: &[u32]) -> Result<bool> {
    let lock = lock_path(path);
    let (file, id, _) = LockFile::open(&lock, allowed_uids).map_err(|e| Error::io("opening the lock file", e))?;
    if !file.try_all().map_err(|e| Error::io("locking the lock file", e))? {
        return Ok(false);
    }
    match sys::remove_stale_socket(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Ok(false),
        Err(e) => return Err(Error::io("removing the control socket", e)),
    }
    if sys::lstat_id(&lock).is_ok_and(|now| now.same_file(&id)) {
        std::fs::remove_file(&lock).map_err(|e| Error::io("removing the lock file", e))?;
    }
    Ok(true)
}
