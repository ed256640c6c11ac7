//! Shared datastore (adapter over a directory both hosts see): VM disk files and the lock
//! that says which host owns a VM's disk.
//!
//! Each VM has `<vm>.vmdk` (a plain file; the VM's disk writes are appended records) and
//! `<vm>.lock`. Owning the disk means holding an exclusive `flock(2)` on the lock file
//! (std `File::try_lock`), taken without blocking; the owner's name is written into the
//! file for humans and error messages. The kernel drops the lock when the holder closes
//! it or dies, so a crashed host never keeps a VM's disk. At switch-over the source drops
//! its lock and the target takes it: one owner at a time.
//!
//! The owner's name is written in place into a fixed-width record at the start of the
//! lock file, and blanked in place on release: once a lock file exists, passing the lock
//! on needs no new space, so a full datastore cannot stop a hand-over half-way.
//!
//! Claims (`claims/<key>.claim`) make a VM's name, MAC and IP unique across every host
//! that shares the datastore. A claim is held with a *shared* `flock` by every host that
//! holds the VM: the host that runs it, and during a migration the target as well, so a
//! VM's claims travel with it without a moment when nobody holds them. The file names
//! the VM and its host. Another VM finds the claim held and is refused, naming the
//! holder; a crashed host's flocks vanish with it, so its claims never block for long,
//! exactly as its disk locks do. Every claim operation runs under one exclusive flock on
//! `claims/guard`, so a check and the take that follows it cannot interleave with
//! another host's.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::wire::MacAddr;

/// Longest VM or owner name.
pub const MAX_NAME_LEN: usize = crate::names::MAX_LEN;

/// Errors of the datastore.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error(transparent)]
    BadName(#[from] crate::names::NameError),
    #[error("disk of {vm} is locked by {owner}")]
    Held { vm: String, owner: String },
    #[error("{key} is in use by VM {vm} on host {host}")]
    Claimed {
        key: ClaimKey,
        vm: String,
        host: String,
    },
    #[error("the datastore's claims are busy (another host holds {0} for too long)")]
    ClaimsBusy(PathBuf),
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

    /// Creates `vm`'s disk and takes its lock for `owner`, as `vm create` does. If that
    /// fails, the files this call created are removed again, so a failed create leaves
    /// nothing behind. Also returns whether the disk is new.
    pub fn create_locked(&self, vm: &str, owner: &str) -> Result<(DiskLock, bool), DatastoreError> {
        let disk = self.disk_path(vm)?;
        let lock_path = self.lock_path(vm)?;
        let disk_new = !disk.exists();
        let lock_new = !lock_path.exists();
        let r = self.create_disk(vm).and_then(|_| self.lock(vm, owner));
        match r {
            Ok(l) => Ok((l, disk_new)),
            Err(e) => {
                // A held lock belongs to someone else: touch nothing.
                if !matches!(e, DatastoreError::Held { .. }) {
                    if disk_new {
                        let _ = std::fs::remove_file(&disk);
                    }
                    if lock_new {
                        let _ = std::fs::remove_file(&lock_path);
                    }
                }
                Err(e)
            }
        }
    }

    /// Removes `vm`'s disk and lock files. Refused with [`DatastoreError::Held`] while a
    /// host holds the disk.
    pub fn remove_disk(&self, vm: &str) -> Result<(), DatastoreError> {
        // Hold the lock while deleting so no host is using the disk meanwhile. Nothing is
        // written, so this works on a full datastore too.
        let (lock_path, lock) = self.flock(vm)?;
        let disk = self.disk_path(vm)?;
        match std::fs::remove_file(&disk) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err("remove disk", &disk)(e));
            }
            _ => {}
        }
        std::fs::remove_file(&lock_path).map_err(io_err("remove lock", &lock_path))?;
        drop(lock);
        Ok(())
    }

    /// Opens `vm`'s lock file and takes its exclusive flock, without blocking.
    fn flock(&self, vm: &str) -> Result<(PathBuf, File), DatastoreError> {
        let lock_path = self.lock_path(vm)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err("open lock", &lock_path))?;
        match file.try_lock() {
            Ok(()) => Ok((lock_path, file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(DatastoreError::Held {
                vm: vm.to_string(),
                owner: read_owner(&mut file).unwrap_or_else(|| "unknown".to_string()),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err("lock", &lock_path)(e)),
        }
    }

    /// Takes the exclusive lock on `vm`'s disk for `owner`, without blocking. Fails with
    /// [`DatastoreError::Held`] naming the current owner if another holder has it (in
    /// this process or any other).
    pub fn lock(&self, vm: &str, owner: &str) -> Result<DiskLock, DatastoreError> {
        validate_name(owner)?;
        let (lock_path, mut file) = self.flock(vm)?;
        write_owner(&mut file, owner).map_err(io_err("write the owner's name into", &lock_path))?;
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

/// What a claim makes unique across the fabric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimKey {
    Name(String),
    Mac(MacAddr),
    Ip(Ipv4Addr),
}

impl ClaimKey {
    /// The three claims of a VM.
    pub fn of_vm(name: &str, mac: MacAddr, ip: Ipv4Addr) -> Vec<ClaimKey> {
        vec![
            ClaimKey::Name(name.to_string()),
            ClaimKey::Mac(mac),
            ClaimKey::Ip(ip),
        ]
    }

    fn file_name(&self) -> Result<String, DatastoreError> {
        Ok(match self {
            ClaimKey::Name(n) => {
                validate_name(n)?;
                format!("name-{n}.claim")
            }
            ClaimKey::Mac(m) => format!("mac-{}.claim", m.to_string().replace(':', "-")),
            ClaimKey::Ip(ip) => format!("ip-{ip}.claim"),
        })
    }
}

impl fmt::Display for ClaimKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimKey::Name(n) => write!(f, "the name {n}"),
            ClaimKey::Mac(m) => write!(f, "MAC {m}"),
            ClaimKey::Ip(ip) => write!(f, "IP {ip}"),
        }
    }
}

/// Why claims are taken: a new VM may use nothing another host holds; a VM migrating in
/// may use what is held in its own name (its source holds it until the move ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimMode {
    Create,
    Migrate,
}

/// How long a claim operation waits for another host's.
const GUARD_WAIT: Duration = Duration::from_secs(2);

impl Datastore {
    fn claims_dir(&self) -> Result<PathBuf, DatastoreError> {
        let dir = self.dir.join("claims");
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(io_err("create claims directory", &dir))?;
        }
        Ok(dir)
    }

    /// Runs `f` under the exclusive guard of every claim operation.
    fn with_guard<T>(
        &self,
        f: impl FnOnce(&Path) -> Result<T, DatastoreError>,
    ) -> Result<T, DatastoreError> {
        let dir = self.claims_dir()?;
        let path = dir.join("guard");
        let guard = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("open claims guard", &path))?;
        let start = Instant::now();
        loop {
            match guard.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < GUARD_WAIT => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(DatastoreError::ClaimsBusy(path))
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(io_err("lock claims guard", &path)(e))
                }
            }
        }
        let r = f(&dir);
        let _ = guard.unlock();
        r
    }

    /// Claims `keys` for VM `vm` on `host`. Refused with [`DatastoreError::Claimed`],
    /// naming the holder, if another VM holds any of them ([`ClaimMode::Create`]: any
    /// holder at all). All or nothing: on failure nothing is held and the files this call
    /// created are gone.
    pub fn claim(
        &self,
        vm: &str,
        host: &str,
        keys: &[ClaimKey],
        mode: ClaimMode,
    ) -> Result<Claims, DatastoreError> {
        validate_name(vm)?;
        validate_name(host)?;
        self.with_guard(|dir| {
            let mut held: Vec<ClaimFile> = Vec::new();
            let mut fresh: Vec<PathBuf> = Vec::new();
            let r = (|| {
                for key in keys {
                    let path = dir.join(key.file_name()?);
                    let existed = path.exists();
                    let mut file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&path)
                        .map_err(io_err("open claim", &path))?;
                    if !existed {
                        fresh.push(path.clone());
                    }
                    match file.try_lock() {
                        // Nobody holds it (a dead host's name in the file does not count).
                        Ok(()) => {
                            write_holder(&mut file, vm, host)
                                .map_err(io_err("write claim", &path))?;
                        }
                        Err(std::fs::TryLockError::WouldBlock) => {
                            let (hvm, hhost) = read_holder(&mut file);
                            if mode == ClaimMode::Create || hvm != vm {
                                return Err(DatastoreError::Claimed {
                                    key: key.clone(),
                                    vm: hvm,
                                    host: hhost,
                                });
                            }
                        }
                        Err(std::fs::TryLockError::Error(e)) => {
                            return Err(io_err("lock claim", &path)(e))
                        }
                    }
                    // Shared from here on: the other holder of a travelling VM keeps its
                    // own. Nobody else holds it exclusively (we hold the guard).
                    file.lock_shared().map_err(io_err("lock claim", &path))?;
                    held.push(ClaimFile { path, file });
                }
                Ok(())
            })();
            match r {
                Ok(()) => Ok(Claims {
                    vm: vm.to_string(),
                    files: held,
                }),
                Err(e) => {
                    drop(held);
                    for p in fresh {
                        let _ = std::fs::remove_file(p);
                    }
                    Err(e)
                }
            }
        })
    }

    /// Who holds `key`: (VM, host), or None if nobody does.
    pub fn claim_holder(&self, key: &ClaimKey) -> Option<(String, String)> {
        let path = self.dir.join("claims").join(key.file_name().ok()?);
        let mut file = OpenOptions::new().read(true).write(true).open(path).ok()?;
        match file.try_lock() {
            Ok(()) => {
                let _ = file.unlock();
                None
            }
            Err(std::fs::TryLockError::WouldBlock) => Some(read_holder(&mut file)),
            Err(_) => None,
        }
    }

    /// Gives up `claims` for good (the VM is destroyed): a file nobody else holds is
    /// removed.
    pub fn release_claims(&self, claims: Claims) -> Result<(), DatastoreError> {
        self.with_guard(|_| {
            for ClaimFile { path, file } in claims.files {
                let _ = file.unlock();
                if file.try_lock().is_ok() {
                    std::fs::remove_file(&path).map_err(io_err("remove claim", &path))?;
                }
            }
            Ok(())
        })
    }

    /// Records `host` as the holder of `claims` (the VM now runs there). In place, so it
    /// needs no space; a failure leaves only the name in the file stale.
    pub fn move_claims(&self, claims: &mut Claims, host: &str) -> Result<(), DatastoreError> {
        validate_name(host)?;
        let vm = claims.vm.clone();
        self.with_guard(|_| {
            for c in &mut claims.files {
                write_holder(&mut c.file, &vm, host).map_err(io_err("write claim", &c.path))?;
            }
            Ok(())
        })
    }
}

/// One held claim file.
#[derive(Debug)]
struct ClaimFile {
    path: PathBuf,
    file: File,
}

/// A VM's claims on this host. Dropping them releases the flocks and leaves the files
/// (the VM's other host may hold them); [`Datastore::release_claims`] removes them.
#[derive(Debug)]
pub struct Claims {
    vm: String,
    files: Vec<ClaimFile>,
}

impl Claims {
    pub fn vm(&self) -> &str {
        &self.vm
    }
}

/// Width of a claim's holder record ("VM HOST", a newline, blanks).
const HOLDER_RECORD: usize = 2 * MAX_NAME_LEN + 2;

fn write_holder(file: &mut File, vm: &str, host: &str) -> std::io::Result<()> {
    let mut rec = format!("{vm} {host}\n");
    while rec.len() < HOLDER_RECORD {
        rec.push(' ');
    }
    file.seek(SeekFrom::Start(0))?;
    file.write_all(rec.as_bytes())?;
    if file.metadata()?.len() != HOLDER_RECORD as u64 {
        file.set_len(HOLDER_RECORD as u64)?;
    }
    file.flush()
}

fn read_holder(file: &mut File) -> (String, String) {
    let mut buf = Vec::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.take(HOLDER_RECORD as u64).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let mut w = text.split_whitespace();
    let vm = w.next().unwrap_or("unknown").to_string();
    let host = w.next().unwrap_or("unknown").to_string();
    (vm, host)
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

/// Width of the owner record: the longest name, a newline, blanks to fill.
const OWNER_RECORD: usize = MAX_NAME_LEN + 1;

/// Writes `owner` (or blanks, for `""`) over the fixed-width record at offset 0. Once the
/// file holds a record, rewriting it allocates nothing, even on a full file system.
fn write_owner(file: &mut File, owner: &str) -> std::io::Result<()> {
    let mut rec = if owner.is_empty() {
        String::new()
    } else {
        format!("{owner}\n")
    };
    while rec.len() < OWNER_RECORD {
        rec.push(' ');
    }
    file.seek(SeekFrom::Start(0))?;
    file.write_all(rec.as_bytes())?;
    // A record from an older, shorter or longer format must not leave a tail.
    if file.metadata()?.len() != OWNER_RECORD as u64 {
        file.set_len(OWNER_RECORD as u64)?;
    }
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

    pub fn lock_path(&self) -> &Path {
        &self.lock_path
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
        // Blank the name first so a reader never sees a released lock with an owner. In
        // place: releasing a lock frees no space that a full datastore could then take
        // away from the next owner.
        let _ = write_owner(&mut self.lock, "");
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

    /// A flock lives as long as any copy of its descriptor: a process that another test
    /// is spawning holds copies until its exec. What a release hands on may take that
    /// moment to come free.
    fn soon<T>(mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match f() {
                Some(v) => return v,
                None if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                None => panic!("still not free after 2 s"),
            }
        }
    }

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
        let b = soon(|| ds.lock("vm1", "silo105").ok());
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
    fn claims_are_unique_travel_with_their_vm_and_go_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let ip = Ipv4Addr::new(10, 10, 0, 100);
        let keys = ClaimKey::of_vm("vm1", mac, ip);
        let a = ds
            .claim("vm1", "silo104", &keys, ClaimMode::Create)
            .unwrap();
        assert_eq!(
            ds.claim_holder(&ClaimKey::Mac(mac)),
            Some(("vm1".into(), "silo104".into()))
        );
        // Another VM with the same IP, anywhere: refused, naming the holder.
        let other = ClaimKey::of_vm("vm2", MacAddr([2, 0, 0, 0, 0, 2]), ip);
        let e = ds
            .claim("vm2", "silo105", &other, ClaimMode::Create)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "IP 10.10.0.100 is in use by VM vm1 on host silo104"
        );
        // All or nothing: vm2's name and MAC, claimed before the IP failed, are free.
        assert_eq!(ds.claim_holder(&ClaimKey::Name("vm2".into())), None);
        assert!(!dir.path().join("claims/name-vm2.claim").exists());
        // The same name created again is refused too; migrating in, it is its own.
        assert!(matches!(
            ds.claim("vm1", "silo105", &keys, ClaimMode::Create),
            Err(DatastoreError::Claimed { .. })
        ));
        let mut b = ds
            .claim("vm1", "silo105", &keys, ClaimMode::Migrate)
            .unwrap();
        ds.move_claims(&mut b, "silo105").unwrap();
        drop(a);
        assert_eq!(
            ds.claim_holder(&ClaimKey::Ip(ip)),
            Some(("vm1".into(), "silo105".into()))
        );
        ds.release_claims(b).unwrap();
        assert_eq!(ds.claim_holder(&ClaimKey::Ip(ip)), None);
        assert!(!dir.path().join("claims/ip-10.10.0.100.claim").exists());
        ds.claim("vm2", "silo105", &other, ClaimMode::Create)
            .unwrap();
    }

    #[test]
    fn a_dead_holders_claim_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        let keys = ClaimKey::of_vm("vm1", MacAddr([2, 0, 0, 0, 0, 1]), Ipv4Addr::LOCALHOST);
        // What a crashed host leaves: its names in the files, no flock.
        drop(
            ds.claim("vm1", "silo104", &keys, ClaimMode::Create)
                .unwrap(),
        );
        assert!(dir.path().join("claims/name-vm1.claim").exists());
        soon(|| ds.claim_holder(&keys[0]).is_none().then_some(()));
        let _c = ds
            .claim("vm9", "silo105", &keys[1..], ClaimMode::Create)
            .unwrap();
    }

    #[test]
    fn passing_the_lock_on_needs_no_new_space() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        let path = dir.path().join("vm1.lock");
        let a = ds.lock("vm1", "silo104").unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        drop(a);
        // Released in place: same size, no name.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert_eq!(ds.owner("vm1"), None);
        let _b = soon(|| ds.lock("vm1", "silo105").ok());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert_eq!(ds.owner("vm1").as_deref(), Some("silo105"));
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
        soon(|| {
            std::process::Command::new("flock")
                .args(["-n", "-x"])
                .arg(dir.path().join("vm1.lock"))
                .arg("true")
                .status()
                .unwrap()
                .success()
                .then_some(())
        });
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
