//! One replica process per data directory.
//!
//! Two live acceptors with one identity would each make promises the other does not know of,
//! and Paxos would then let two values be chosen: "kill it and start it again" while the old
//! process still runs must fail, loudly, before the second one touches the log. The lock is
//! an exclusive `flock` on `<data_dir>/LOCK`, held by an open file for the life of the
//! process: the kernel releases it when the process dies however it dies (kill -9 included),
//! so a stale lock file never blocks a restart. The file also says who holds it, for the
//! refusal message.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = "LOCK";

#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    #[error(
        "another process holds the data directory {} ({holder}); two replicas on one \
         directory would break Paxos. Stop that process first (or point this one at its own \
         directory)",
        dir.display()
    )]
    Held { dir: PathBuf, holder: String },
    #[error("cannot lock the data directory {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Held for as long as the process uses the directory; dropping it releases the lock.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Locks `dir` (creating it if needed) and records `holder` (who we are) in the lock file.
    pub fn take(dir: &Path, holder: &str) -> Result<DirLock, DirLockError> {
        let io = |source| DirLockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim() {
                    "" => "it has not said who it is yet".to_string(),
                    t => t.to_string(),
                };
                return Err(DirLockError::Held {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            return Err(io(err));
        }
        // Who holds it, for the next process's refusal; not needed for the lock itself, so
        // it is not synced.
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{holder}, pid {}", std::process::id()).map_err(io)?;
        Ok(DirLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_named_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::take(dir.path(), "replica 1 on 127.0.0.1:7401").unwrap();
        // flock locks belong to open files, so a second open in the same process conflicts
        // just as another process would.
        let err = DirLock::take(dir.path(), "replica 1 again").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("replica 1 on 127.0.0.1:7401"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(matches!(err, DirLockError::Held { .. }));
        drop(first);
        let again = DirLock::take(dir.path(), "replica 1 again").unwrap();
        let text = std::fs::read_to_string(again.path()).unwrap();
        assert!(text.starts_with("replica 1 again, pid"), "{text}");
    }
}
