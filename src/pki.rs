//! The fabric's PKI (adapter over files): one certificate authority per fabric and one
//! certificate per host, which the hosts present to each other on the vMotion network.
//!
//! Everything lives in one directory (by default `$VFABRIC_RUN_DIR/pki`), created 0700,
//! every file 0600: `ca.pem` and `ca.key` (the authority), `<host>.pem` and `<host>.key`
//! (a host's certificate and key). A host certificate names the host in its subject and
//! in its one DNS subject-alternative name, so a source can check that the peer it
//! reached is the host it meant; it is good for both server and client authentication,
//! since a host is the target of one migration and the source of the next.
//!
//! An operator (the CLI reaching daemons on other machines over TCP, see
//! [`crate::control::tls`]) holds a certificate of the same CA, good for client
//! authentication only, whose one DNS name is `<name>.operator`: `<name>.operator.pem`
//! and `.key`. The dot keeps it out of the host name space ([`crate::names`] refuses
//! dots), so an operator certificate can never pass as a host on the vMotion network,
//! and a host certificate never opens a control connection.
//!
//! The authority's subject is fixed, so issuing rebuilds the issuer from its key alone
//! (no X.509 parser needed); a certificate from another fabric's CA carries the same
//! issuer name but fails its signature check.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::names;

/// Subject of every fabric CA.
const CA_SUBJECT: &str = "vfabric fabric CA";
const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
/// Certificates are valid from a day before issue (clock skew between hosts) for ten years.
const VALID_DAYS: i64 = 3650;

/// The default PKI directory: `pki` under the run directory.
pub fn default_dir() -> PathBuf {
    crate::control::runtime_dir().join("pki")
}

/// Errors of the PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no fabric CA in {0} (run `vfabric pki init`)")]
    NoCa(PathBuf),
    #[error("no certificate for host {name} in {dir} (run `vfabric pki issue {name}`)")]
    NoHostCert { name: String, dir: PathBuf },
    #[error("no certificate for operator {name} in {dir} (run `vfabric pki issue-operator {name}` where the fabric CA is, and copy it here)")]
    NoOperatorCert { name: String, dir: PathBuf },
    #[error("cannot read {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("{path} is open to other users (mode {mode:03o}); keys must be 0600")]
    Mode { path: PathBuf, mode: u32 },
    #[error("cannot generate a certificate")]
    Generate(#[source] rcgen::Error),
    #[error(transparent)]
    Name(#[from] names::NameError),
}

/// What `init` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    Created,
    /// A CA was there already; it is kept (issued certificates stay valid).
    Kept,
}

/// Creates the fabric CA in `dir` unless one is there.
pub fn init(dir: &Path) -> Result<Init, PkiError> {
    make_dir(dir)?;
    if dir.join(CA_CERT).exists() && dir.join(CA_KEY).exists() {
        return Ok(Init::Kept);
    }
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let cert = ca_params().self_signed(&key).map_err(PkiError::Generate)?;
    write_private(&dir.join(CA_KEY), key.serialize_pem().as_bytes())?;
    write_private(&dir.join(CA_CERT), cert.pem().as_bytes())?;
    Ok(Init::Created)
}

/// Issues (or re-issues) the certificate of host `name`, signed by the CA in `dir`.
pub fn issue(dir: &Path, name: &str) -> Result<(), PkiError> {
    names::validate("host", name)?;
    let issuer = load_issuer(dir)?;
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let cert = host_params(name)?
        .signed_by(&key, &issuer)
        .map_err(PkiError::Generate)?;
    write_private(
        &dir.join(format!("{name}.key")),
        key.serialize_pem().as_bytes(),
    )?;
    write_private(&dir.join(format!("{name}.pem")), cert.pem().as_bytes())?;
    Ok(())
}

/// The DNS name suffix of every operator certificate.
pub const OPERATOR_SUFFIX: &str = ".operator";

/// The name an operator certificate of `name` carries (`admin` -> `admin.operator`).
pub fn operator_identity(name: &str) -> String {
    format!("{name}{OPERATOR_SUFFIX}")
}

/// The operator name an authenticated certificate name stands for, if it is one.
pub fn operator_of(identity: &str) -> Option<&str> {
    let name = identity.strip_suffix(OPERATOR_SUFFIX)?;
    names::validate("operator", name).ok()?;
    Some(name)
}

/// Issues (or re-issues) the client certificate of operator `name`, signed by the CA in
/// `dir`: `<name>.operator.pem` and `.key`.
pub fn issue_operator(dir: &Path, name: &str) -> Result<(), PkiError> {
    names::validate("operator", name)?;
    let issuer = load_issuer(dir)?;
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let id = operator_identity(name);
    let mut p = leaf_params(&id)?;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer).map_err(PkiError::Generate)?;
    write_private(
        &dir.join(format!("{id}.key")),
        key.serialize_pem().as_bytes(),
    )?;
    write_private(&dir.join(format!("{id}.pem")), cert.pem().as_bytes())?;
    Ok(())
}

/// Loads operator `name`'s credentials from `dir` (their `name` is `<name>.operator`).
pub fn load_operator(dir: &Path, name: &str) -> Result<HostCredentials, PkiError> {
    names::validate("operator", name)?;
    let id = operator_identity(name);
    if !dir.join(format!("{id}.pem")).exists() || !dir.join(format!("{id}.key")).exists() {
        if !dir.join(CA_CERT).exists() {
            return Err(PkiError::NoCa(dir.to_path_buf()));
        }
        return Err(PkiError::NoOperatorCert {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        });
    }
    load_identity(dir, &id)
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let ca_key_path = dir.join(CA_KEY);
    if !ca_key_path.exists() {
        return Err(PkiError::NoCa(dir.to_path_buf()));
    }
    let ca_key_pem = read_private(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::Read {
        path: ca_key_path.clone(),
        why: e.to_string(),
    })?;
    Ok(Issuer::new(ca_params(), ca_key))
}

/// A host's credentials: the fabric CA it trusts, its certificate and its key.
pub struct HostCredentials {
    pub name: String,
    pub ca: CertificateDer<'static>,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for HostCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCredentials")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Loads host `name`'s credentials from `dir`. Keys open to other users are refused.
pub fn load(dir: &Path, name: &str) -> Result<HostCredentials, PkiError> {
    names::validate("host", name)?;
    if !dir.join(CA_CERT).exists() {
        return Err(PkiError::NoCa(dir.to_path_buf()));
    }
    if !dir.join(format!("{name}.pem")).exists() || !dir.join(format!("{name}.key")).exists() {
        return Err(PkiError::NoHostCert {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        });
    }
    load_identity(dir, name)
}

/// Loads the CA certificate and the certificate and key of `<id>.pem`/`.key`.
fn load_identity(dir: &Path, id: &str) -> Result<HostCredentials, PkiError> {
    let ca_path = dir.join(CA_CERT);
    if !ca_path.exists() {
        return Err(PkiError::NoCa(dir.to_path_buf()));
    }
    let cert_path = dir.join(format!("{id}.pem"));
    let key_path = dir.join(format!("{id}.key"));
    let pem_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: pki_types::pem::Error| PkiError::Read {
            path,
            why: e.to_string(),
        }
    };
    let ca = CertificateDer::from_pem_file(&ca_path).map_err(pem_err(&ca_path))?;
    let cert = CertificateDer::from_pem_file(&cert_path).map_err(pem_err(&cert_path))?;
    let key_pem = read_private(&key_path)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err(&key_path))?;
    Ok(HostCredentials {
        name: id.to_string(),
        ca,
        cert,
        key,
    })
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_SUBJECT);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p);
    p
}

fn host_params(name: &str) -> Result<CertificateParams, PkiError> {
    let mut p = leaf_params(name)?;
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(p)
}

/// A leaf certificate naming `name` in its subject and its one DNS name.
fn leaf_params(name: &str) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(vec![name.to_string()]).map_err(PkiError::Generate)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p);
    Ok(p)
}

fn validity(p: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(VALID_DAYS);
}

/// Creates `dir` (and missing parents) 0700; an existing directory is left as it is.
fn make_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Create {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes `bytes` to a new file created 0600, then renames it over `path`, so a reader
/// never sees half a key and the key is never readable by others, even for a moment.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let create = |source| PkiError::Create {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(create)?;
    f.write_all(bytes).map_err(create)?;
    f.sync_all().map_err(create)?;
    std::fs::rename(&tmp, path).map_err(create)
}

fn read_private(path: &Path) -> Result<String, PkiError> {
    let read = |e: std::io::Error| PkiError::Read {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::Mode {
            path: path.to_path_buf(),
            mode,
        });
    }
    std::fs::read_to_string(path).map_err(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_issue_load_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run").join("pki");
        assert_eq!(init(&dir).unwrap(), Init::Created);
        assert_eq!(init(&dir).unwrap(), Init::Kept);
        issue(&dir, "silo104").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for f in ["ca.pem", "ca.key", "silo104.pem", "silo104.key"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        let c = load(&dir, "silo104").unwrap();
        let ee = webpki::EndEntityCert::try_from(&c.cert).unwrap();
        assert_eq!(ee.valid_dns_names().collect::<Vec<_>>(), vec!["silo104"]);
        assert!(matches!(
            load(&dir, "silo105"),
            Err(PkiError::NoHostCert { .. })
        ));
        assert!(matches!(issue(&dir, "../x"), Err(PkiError::Name(_))));
        // A key others can read is refused.
        std::fs::set_permissions(
            dir.join("silo104.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(load(&dir, "silo104"), Err(PkiError::Mode { .. })));
        // An operator's certificate: its own files, a name no host can have.
        issue_operator(&dir, "admin").unwrap();
        let op = load_operator(&dir, "admin").unwrap();
        assert_eq!(op.name, "admin.operator");
        let ee = webpki::EndEntityCert::try_from(&op.cert).unwrap();
        let id: Vec<_> = ee.valid_dns_names().collect();
        assert_eq!(id, vec!["admin.operator"]);
        assert_eq!(operator_of(id[0]), Some("admin"));
        assert_eq!(operator_of("silo104"), None);
        assert!(crate::names::validate("host", id[0]).is_err());
        assert_eq!(mode(&dir.join("admin.operator.key")), 0o600);
        assert!(matches!(
            load_operator(&dir, "bob"),
            Err(PkiError::NoOperatorCert { .. })
        ));
        assert!(matches!(
            issue_operator(&dir, "a/b"),
            Err(PkiError::Name(_))
        ));
        let other = tmp.path().join("other");
        assert!(matches!(issue(&other, "silo104"), Err(PkiError::NoCa(_))));
    }
}
