//! The daemon's pid file: written under an exclusive lock that lives as long as the daemon.
//!
//! `bosun run` opens the file without following a symbolic link (a link planted in a shared
//! directory cannot redirect the write), takes an exclusive `flock` on it, and only then
//! writes its pid. A second `bosun run` on the same file finds the lock held and stops
//! without touching the file. The holder removes the file when it exits, while it still
//! holds the lock, and only if the path still names the file it locked.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use super::CliError;

/// A locked pid file holding this process's id; removed on drop.
pub struct PidFile {
    file: File,
    path: PathBuf,
}

impl PidFile {
    /// Opens (or creates) `path`, locks it and writes this process's id into it. Fails,
    /// leaving the file as it is, when another process holds the lock.
    pub fn acquire(path: &Path) -> Result<Self, CliError> {
        let mut file = open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut held = String::new();
                let _ = file.read_to_string(&mut held);
                let holder = match held.trim().parse::<i32>() {
                    Ok(pid) => format!("process {pid}"),
                    Err(_) => "another process".to_owned(),
                };
                return Err(CliError::Other(anyhow::anyhow!(
                    "the pid file {} is locked by {holder}: a bosun daemon with this configuration is already running; not starting a second one",
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(CliError::Other(anyhow::anyhow!(
                    "cannot lock the pid file {}: {e}",
                    path.display()
                )));
            }
        }
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(format!("{}\n", std::process::id()).as_bytes())?;
            file.sync_all()
        };
        write(&mut file).map_err(|e| {
            CliError::Other(anyhow::anyhow!(
                "cannot write the pid file {}: {e}",
                path.display()
            ))
        })?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only our own file: never one that replaced it at the same path.
        let ours = self.file.metadata().ok();
        let there = std::fs::symlink_metadata(&self.path).ok();
        if let (Some(ours), Some(there)) = (ours, there)
            && ours.dev() == there.dev()
            && ours.ino() == there.ino()
        {
            let _ = std::fs::remove_file(&self.path);
        }
        // The lock goes with the file descriptor, after the removal.
    }
}

fn open(path: &Path) -> Result<File, CliError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            let hint = if e.raw_os_error() == Some(nix::libc::ELOOP) {
                " (it is a symbolic link; bosun does not write through one)"
            } else {
                ""
            };
            CliError::Other(anyhow::anyhow!(
                "cannot open the pid file {}: {e}{hint}",
                path.display()
            ))
        })
}
