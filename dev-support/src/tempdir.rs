//! A temporary directory that removes itself.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh directory `we-<tag>-<pid>-<n>` under [`std::env::temp_dir`], removed with its
/// contents when dropped.
///
/// The pid and a per-process counter make the name unique among live processes; a leftover
/// of a dead process that had the same pid is removed first. The tag is cut to 24 characters
/// because a unix socket path (`sun_path`) holds at most 107 bytes and tests put their control
/// socket in here.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

/// The longest tag kept in a directory name.
const MAX_TAG: usize = 24;

impl TempDir {
    /// Create the directory.
    ///
    /// # Panics
    /// If it cannot be created (a harness cannot go on without it);
    /// [`try_new`](TempDir::try_new) returns the error instead.
    pub fn new(tag: &str) -> TempDir {
        TempDir::try_new(tag).unwrap_or_else(|e| panic!("creating a temporary directory for {tag:?}: {e}"))
    }

    /// Create the directory, or say why not.
    pub fn try_new(tag: &str) -> std::io::Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag.chars().take(MAX_TAG).map(|c| if c == '/' { '-' } else { c }).collect();
        TempDir::fresh(std::env::temp_dir().join(format!("we-{tag}-{}-{n}", std::process::id())))
    }

    /// `path`, emptied of any leftover and created.
    fn fresh(path: PathBuf) -> std::io::Result<TempDir> {
        match std::fs::remove_dir_all(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_unique_under_temp_dir_and_removed_on_drop() {
        let a = TempDir::new("unit");
        let b = TempDir::new("unit");
        assert_ne!(a.path(), b.path());
        for d in [&a, &b] {
            assert!(d.path().is_dir());
            assert!(d.path().starts_with(std::env::temp_dir()));
            let name = d.path().file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with("we-unit-"), "{name}");
            assert!(name.contains(&std::process::id().to_string()), "{name}");
        }
        std::fs::create_dir(a.join("sub")).unwrap();
        std::fs::write(a.join("sub/file"), b"x").unwrap();
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists(), "removed with its contents");
        assert!(b.path().is_dir(), "the other one is untouched");
    }

    #[test]
    fn long_tags_are_cut_and_slashes_replaced() {
        let d = TempDir::new("a/very-long-tag-name-that-goes-on-and-on-and-on");
        let name = d.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("we-a-very-long-tag-name-tha-"), "{name}");
        assert_eq!(d.path().parent(), Some(std::env::temp_dir().as_path()));
        assert!(d.as_ref().is_dir());
    }

    #[test]
    fn a_leftover_with_the_same_name_is_replaced() {
        // As a dead process with our pid could have left it.
        let planted = std::env::temp_dir().join(format!("we-leftover-{}-x", std::process::id()));
        std::fs::create_dir_all(&planted).unwrap();
        std::fs::write(planted.join("stale"), b"old").unwrap();
        let fresh = TempDir::fresh(planted.clone()).unwrap();
        assert!(fresh.path().is_dir());
        assert!(!fresh.join("stale").exists(), "the leftover's contents are gone");
        drop(fresh);
        assert!(!planted.exists());
    }
}
