//! Shared datastore (adapter over a directory both hosts see): VM disk files and the lock
//! that says which host owns a VM's disk.
//!
//! Each VM has `<vm>.vmdk` (a plain file; the VM's disk writes are appended records) and
//! `<vm>.lock`. Owning the disk means holding an exclusive `flock(2)` on the lock file
//! (std `File::try_lock`), taken without blocking; the owner's name is written into the
//! file for humans and error messages. The kernel drops the lock when the holder closes
//! it or dies, so a crashed host never keeps a VM's disk. At switch-over the source drops
//! its lock and the target takes it: one owner at a time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Longest VM or owner name.
pub const MAX_NAME_LEN: usize = crate::names::MAX_LEN;

/// Errors of the datastore.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error(transparent)]
    BadName(#[from] crate::names::NameError),
    #[error("disk of {vm} is locked by {owner}")]
    Held { vm: String, owner: String },
    #[error("disk record must be one line of text")]
    BadRecord,
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DatastoreError + 'a {
    move |source| DatastoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks a VM or owner name: it becomes part of a file name and must not escape the
/// datastore directory (the one rule of [`crate::names`]).
pub fn validate_name(name: &str) -> Result<(), DatastoreError> {
    crate::names::validate("VM or host", name)?;
    Ok(())
}

/// A datastore directory.
#[derive(Debug, Clone)]
pub struct Datastore {
    dir: PathBuf,
}

impl Datastore {
    /// Opens the datastore at `dir`, creating the directory if needed.
    pub fn open(dir: &Path) -> Result<Datastore, DatastoreError> {
        std::fs::create_dir_all(dir).map_err(io_err("create datastore", dir))?;
        Ok(Datastore {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of `vm`'s disk file (the name is validated).
    pub fn disk_path(&self, vm: &str) -> Result<PathBuf, DatastoreError> {
        validate_name(vm)?;
        Ok(self.dir.join(format!("{vm}.vmdk")))
    }

    fn lock_path(&self, vm: &str) -> Result<PathBuf, DatastoreError> {
        validate_name(vm)?;
        Ok(self.dir.join(format!("{vm}.lock")))
    }

    /// Creates `vm`'s disk file if it does not exist (an existing disk is kept: a VM
    /// created again on another host finds its disk) and returns its path.
    pub fn create_disk(&self, vm: &str) -> Result<PathBuf, DatastoreError> {
        let path = self.disk_path(vm)?;
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("create disk", &path))?;
        Ok(path)
    }

    /// Removes `vm`'s disk and lock files. Refused with [`DatastoreError::Held`] while a
    /// host holds the disk.
    pub fn remove_disk(&self, vm: &str) -> Result<(), DatastoreError> {
        // Hold the lock while deleting so no host is using the disk meanwhile.
        let lock = self.lock(vm, "remove")?;
        let disk = self.disk_path(vm)?;
        match std::fs::remove_file(&disk) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err("remove disk", &disk)(e));
            }
            _ => {}
        }
        let path = lock.lock_path.clone();
        std::fs::remove_file(&path).map_err(io_err("remove lock", &path))?;
        drop(lock);
        Ok(())
    }

    /// Takes the exclusive lock on `vm`'s disk for `owner`, without blocking. Fails with
    /// [`DatastoreError::Held`] naming the current owner if another holder has it (in
    /// this process or any other).
    pub fn lock(&self, vm: &str, owner: &str) -> Result<DiskLock, DatastoreError> {
        validate_name(owner)?;
        let lock_path = self.lock_path(vm)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err("open lock", &lock_path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(DatastoreError::Held {
                    vm: vm.to_string(),
                    owner: read_owner(&mut file).unwrap_or_else(|| "unknown".to_string()),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }
        write_owner(&mut file, owner).map_err(io_err("write owner to", &lock_path))?;
        let disk_path = self.disk_path(vm)?;
        let disk = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&disk_path)
            .map_err(io_err("open disk", &disk_path))?;
        Ok(DiskLock {
            vm: vm.to_string(),
            owner: owner.to_string(),
            lock_path,
            lock: file,
            disk_path,
            disk,
        })
    }

    /// Who holds `vm`'s disk, or `None` if nobody does. Read from the kernel's lock
    /// table (`/proc/locks`), not by trying the lock: a probe that took the lock, even
    /// shared, would make a host's exclusive take-over fail at that very moment. A name
    /// left in the file by a dead holder does not count.
    pub fn owner(&self, vm: &str) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let path = self.lock_path(vm).ok()?;
        let mut file = File::open(&path).ok()?;
        let meta = file.metadata().ok()?;
        let locks = std::fs::read_to_string("/proc/locks").ok()?;
        if !flock_held(&locks, meta.dev(), meta.ino()) {
            return None;
        }
        Some(read_owner(&mut file).unwrap_or_else(|| "unknown".to_string()))
    }
}

/// True when `/proc/locks` text shows an exclusive flock on the file (`dev`, `ino`).
/// Lines read `1: FLOCK  ADVISORY  WRITE 1234 fd:01:123456 0 EOF` (device major and
/// minor in hex, inode in decimal); blocked waiters (`->`) do not hold the lock.
fn flock_held(locks: &str, dev: u64, ino: u64) -> bool {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    locks.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[1] != "FLOCK" || f[3] != "WRITE" {
            return false;
        }
        let mut id = f[5].split(':');
        let (Some(ma), Some(mi), Some(i)) = (id.next(), id.next(), id.next()) else {
            return false;
        };
        u32::from_str_radix(ma, 16).ok() == Some(major)
            && u32::from_str_radix(mi, 16).ok() == Some(minor)
            && i.parse::<u64>().ok() == Some(ino)
    })
}

fn read_owner(file: &mut File) -> Option<String> {
    let mut buf = Vec::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    // Names are short; cap the read whatever the file holds.
    file.take(MAX_NAME_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .ok()?;
    let s = String::from_utf8_lossy(&buf).trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn write_owner(file: &mut File, owner: &str) -> std::io::Result<()> {
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(format!("{owner}\n").as_bytes())?;
    file.flush()
}

/// Ownership of one VM's disk. Dropping it releases the lock.
#[derive(Debug)]
pub struct DiskLock {
    vm: String,
    owner: String,
    lock_path: PathBuf,
    lock: File,
    disk_path: PathBuf,
    disk: File,
}

impl DiskLock {
    pub fn vm(&self) -> &str {
        &self.vm
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn disk_path(&self) -> &Path {
        &self.disk_path
    }

    /// Appends `record` as one line to the VM's disk file (one write call, so records of
    /// successive owners never interleave within a line).
    pub fn append(&self, record: &str) -> Result<(), DatastoreError> {
        if record.contains(['\n', '\r']) {
            return Err(DatastoreError::BadRecord);
        }
        let line = format!("{record}\n");
        (&self.disk)
            .write_all(line.as_bytes())
            .map_err(io_err("append to disk", &self.disk_path))
    }
}

impl Drop for DiskLock {
    fn drop(&mut self) {
        // Clear the name first so a reader never sees a released lock with an owner.
        let _ = self.lock.set_len(0);
        let _ = self.lock.unlock();
    }
}

#[cfg(test)]
mod lock_table_tests {
    use super::flock_held;

    #[test]
    fn reads_exclusive_flocks_from_the_lock_table() {
        let table = "1: POSIX  ADVISORY  WRITE 99 fd:01:42 0 EOF\n\
                     2: FLOCK  ADVISORY  READ 98 fd:01:42 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 1234 103:02:7 0 EOF\n\
                     3: -> FLOCK  ADVISORY  WRITE 1235 fd:01:42 0 EOF\n";
        let dev = |ma: u32, mi: u32| libc::makedev(ma, mi);
        assert!(flock_held(table, dev(0x103, 2), 7));
        assert!(
            !flock_held(table, dev(0xfd, 1), 42),
            "POSIX, shared and waiting locks"
        );
        assert!(!flock_held(table, dev(0x103, 3), 7));
        assert!(!flock_held("", dev(0x103, 2), 7));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_conflicts_and_release_passes_it_on() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(&dir.path().join("ds")).unwrap();
        ds.create_disk("vm1").unwrap();
        assert_eq!(ds.owner("vm1"), None);

        let a = ds.lock("vm1", "silo104").unwrap();
        assert_eq!(ds.owner("vm1").as_deref(), Some("silo104"));
        match ds.lock("vm1", "silo105") {
            Err(DatastoreError::Held { vm, owner }) => {
                assert_eq!((vm.as_str(), owner.as_str()), ("vm1", "silo104"));
            }
            other => panic!("expected Held, got {other:?}"),
        }
        let e = ds.lock("vm1", "silo105").unwrap_err();
        assert_eq!(e.to_string(), "disk of vm1 is locked by silo104");
        a.append("write 1 from silo104").unwrap();

        drop(a);
        assert_eq!(ds.owner("vm1"), None);
        let b = ds.lock("vm1", "silo105").unwrap();
        assert_eq!(ds.owner("vm1").as_deref(), Some("silo105"));
        b.append("write 2 from silo105").unwrap();
        assert!(matches!(
            b.append("two\nlines"),
            Err(DatastoreError::BadRecord)
        ));

        let disk = std::fs::read_to_string(ds.disk_path("vm1").unwrap()).unwrap();
        assert_eq!(disk, "write 1 from silo104\nwrite 2 from silo105\n");

        // Other VMs are independent.
        let _c = ds.lock("vm2", "silo104").unwrap();
        assert!(matches!(
            ds.remove_disk("vm1"),
            Err(DatastoreError::Held { .. })
        ));
        drop(b);
        ds.remove_disk("vm1").unwrap();
        assert!(!ds.disk_path("vm1").unwrap().exists());
        assert_eq!(ds.owner("vm1"), None);
    }

    #[test]
    fn lock_held_by_a_dead_process_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        // A name left in the file without a live flock: what a crashed host leaves.
        std::fs::write(dir.path().join("vm1.lock"), "silo104\n").unwrap();
        assert_eq!(ds.owner("vm1"), None);
        let l = ds.lock("vm1", "silo105").unwrap();
        assert_eq!(ds.owner("vm1").as_deref(), Some("silo105"));
        drop(l);
    }

    #[test]
    fn lock_is_seen_by_another_process() {
        // flock(1) from util-linux holds the lock in a child process.
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        let lock = ds.lock("vm1", "silo104").unwrap();
        let status = std::process::Command::new("flock")
            .args(["-n", "-x"])
            .arg(dir.path().join("vm1.lock"))
            .arg("true")
            .status();
        let Ok(status) = status else {
            eprintln!("SKIPPED lock_is_seen_by_another_process: flock(1) not installed");
            return;
        };
        assert!(!status.success(), "another process got the lock");
        drop(lock);
        let status = std::process::Command::new("flock")
            .args(["-n", "-x"])
            .arg(dir.path().join("vm1.lock"))
            .arg("true")
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn names_cannot_escape_the_datastore() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        for bad in [
            "",
            "..",
            ".",
            "../x",
            "a/b",
            "/etc",
            ".hidden",
            "-rf",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(ds.create_disk(bad), Err(DatastoreError::BadName(_))),
                "{bad:?}"
            );
            assert!(
                matches!(ds.lock(bad, "h"), Err(DatastoreError::BadName(_))),
                "{bad:?}"
            );
            assert!(
                matches!(ds.lock("vm", bad), Err(DatastoreError::BadName(_))),
                "{bad:?}"
            );
            assert_eq!(ds.owner(bad), None);
        }
        for good in ["vm1", "vm-1-a-b", &"x".repeat(31)] {
            ds.create_disk(good).unwrap();
        }
    }
}
