//! vMotion transport security (adapter): TLS 1.3 with mutual authentication around the
//! migration stream, the three encryption modes, and the first-byte negotiation.
//!
//! Both ends present a certificate of the fabric CA ([`crate::pki`]). The source checks
//! that the target's certificate names the host it meant to reach (the target of the
//! migrate request), the target that the source's certificate chains to the fabric CA
//! and names a valid host. Only then does a byte of the migration protocol cross, so an
//! unauthenticated peer never reaches admission, reservation or the protocol decoder.
//!
//! Negotiation needs no extra round trip: a TLS connection opens with a handshake
//! record (first byte 0x16), the plaintext protocol with its magic `VFMG`, so the
//! target tells them apart by peeking at the first byte. Modes (vSphere's names):
//!
//! - `required`: only authenticated TLS, both ways.
//! - `opportunistic`: the source tries TLS first when it has credentials; it falls back
//!   to plaintext only when the target closes the connection on the TLS hello (a host
//!   with encryption disabled), never after a failed certificate check (that peer is an
//!   impostor, not an older host). The target accepts either, and still requires a
//!   fabric certificate from any peer that speaks TLS.
//! - `disabled`: plaintext only; the target closes TLS connections.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::Resumption;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::conn::MigrationStream;
use super::records::{Cork, RecordStream};
use crate::pki::HostCredentials;

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// A migration stream, encrypted or not.
pub type Stream = Box<dyn MigrationStream>;

/// The encryption setting of a host or of one migration (vSphere's names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    /// Only authenticated, encrypted streams.
    #[default]
    Required,
    /// Encrypted when both ends can; plaintext with a host that has encryption off.
    Opportunistic,
    /// Plaintext only.
    Disabled,
}

impl FromStr for Encryption {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "required" => Ok(Encryption::Required),
            "opportunistic" => Ok(Encryption::Opportunistic),
            "disabled" => Ok(Encryption::Disabled),
            _ => Err(format!(
                "{s:?}: expected required, opportunistic or disabled"
            )),
        }
    }
}

impl fmt::Display for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encryption::Required => "required",
            Encryption::Opportunistic => "opportunistic",
            Encryption::Disabled => "disabled",
        })
    }
}

/// How one migration stream was protected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protection {
    /// TLS 1.3; `peer` is the authenticated host name of the other end.
    Tls {
        peer: String,
    },
    Plaintext,
}

impl Protection {
    pub fn is_encrypted(&self) -> bool {
        matches!(self, Protection::Tls { .. })
    }
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protection::Tls { peer } => write!(f, "TLS 1.3, peer {peer} authenticated"),
            Protection::Plaintext => f.write_str("plaintext, peer not authenticated"),
        }
    }
}

/// Errors of building a host's TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad fabric CA certificate")]
    Ca(#[source] rustls::Error),
    #[error("cannot build the client verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("bad host certificate or key")]
    Cert(#[source] rustls::Error),
}

/// A host's TLS setup: its identity and the fabric CA it trusts.
pub struct Tls {
    name: String,
    client: TlsConnector,
    server: TlsAcceptor,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("name", &self.name).finish()
    }
}

impl Tls {
    pub fn new(creds: &HostCredentials) -> Result<Tls, TlsError> {
        // AES-128-GCM first: the fastest suite with the CPU's AES instructions, and
        // ample for a stream that lives as long as one migration.
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        let provider = Arc::new(provider);
        let mut roots = RootCertStore::empty();
        roots.add(creds.ca.clone()).map_err(TlsError::Ca)?;
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(TlsError::Verifier)?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Cert)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![creds.cert.clone()], creds.key.clone_key())
            .map_err(TlsError::Cert)?;
        // One connection per migration: nothing to resume, nothing to keep.
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        // Records are protected by `records` once the handshake is done.
        server.enable_secret_extraction = true;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Cert)?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![creds.cert.clone()], creds.key.clone_key())
            .map_err(TlsError::Cert)?;
        client.resumption = Resumption::disabled();
        client.enable_secret_extraction = true;
        Ok(Tls {
            name: creds.name.clone(),
            client: TlsConnector::from(Arc::new(client)),
            server: TlsAcceptor::from(Arc::new(server)),
        })
    }

    /// The client side's rustls configuration (for tests driving rustls directly).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.config().clone()
    }

    /// The server side's rustls configuration.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.config().clone()
    }

    /// This host's name, as its certificate states it.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Why the source could not open a migration stream.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {target} at {addr}")]
    Tcp {
        target: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {target} at {addr} timed out")]
    Timeout { target: String, addr: SocketAddr },
    #[error("vMotion encryption is required but this host has no certificate")]
    NoCredentials,
    #[error("{target} at {addr} closed the connection on our TLS hello (is its vMotion encryption disabled?)")]
    TlsRefused { target: String, addr: SocketAddr },
    #[error("{target} at {addr} did not authenticate as {target}: {source}")]
    Authentication {
        target: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Opens the source's end of a migration stream to `target` at `addr`, protected as
/// `mode` asks. `timeout` bounds the connect and the handshake each.
pub async fn connect(
    addr: SocketAddr,
    target: &str,
    mode: Encryption,
    tls: Option<&Tls>,
    timeout: Duration,
) -> Result<(Stream, Protection), ConnectError> {
    let tls = match (mode, tls) {
        (Encryption::Disabled, _) | (Encryption::Opportunistic, None) => None,
        (Encryption::Required, None) => return Err(ConnectError::NoCredentials),
        (_, Some(t)) => Some(t),
    };
    let Some(tls) = tls else {
        let tcp = tcp_connect(addr, target, timeout).await?;
        return Ok((Box::new(tcp), Protection::Plaintext));
    };
    match tls_connect(addr, target, tls, timeout).await {
        Ok(s) => Ok((
            s,
            Protection::Tls {
                peer: target.to_string(),
            },
        )),
        Err(ConnectError::Authentication { source, .. })
            if mode == Encryption::Opportunistic && refused_tls(&source) =>
        {
            tracing::info!(target, %addr, "target does not accept TLS: migrating in plaintext");
            let tcp = tcp_connect(addr, target, timeout).await?;
            Ok((Box::new(tcp), Protection::Plaintext))
        }
        Err(ConnectError::Authentication { source, .. }) if refused_tls(&source) => {
            Err(ConnectError::TlsRefused {
                target: target.to_string(),
                addr,
            })
        }
        Err(e) => Err(e),
    }
}

/// The peer closed the connection on our TLS hello without a TLS answer: a host that
/// does not speak TLS, not one that failed to prove who it is.
fn refused_tls(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

async fn tcp_connect(
    addr: SocketAddr,
    target: &str,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            return Err(ConnectError::Tcp {
                target: target.to_string(),
                addr,
                source,
            })
        }
        Err(_) => {
            return Err(ConnectError::Timeout {
                target: target.to_string(),
                addr,
            })
        }
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

async fn tls_connect(
    addr: SocketAddr,
    target: &str,
    tls: &Tls,
    timeout: Duration,
) -> Result<Stream, ConnectError> {
    let auth = |source| ConnectError::Authentication {
        target: target.to_string(),
        addr,
        source,
    };
    // Host names are valid DNS names (see crate::names); the check is the certificate's.
    let server_name = pki_types::ServerName::try_from(target.to_string()).map_err(|e| {
        auth(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            e.to_string(),
        ))
    })?;
    let tcp = tcp_connect(addr, target, timeout).await?;
    match tokio::time::timeout(timeout, tls.client.connect(server_name, Cork::new(tcp))).await {
        Ok(Ok(s)) => {
            let (cork, conn) = s.into_inner();
            Ok(Box::new(
                RecordStream::take_over(cork.into_inner(), conn).map_err(auth)?,
            ))
        }
        Ok(Err(e)) => Err(auth(e)),
        Err(_) => Err(auth(std::io::ErrorKind::TimedOut.into())),
    }
}

/// Why an incoming connection was closed before the migration protocol started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Plaintext while this host requires encryption.
    Plaintext,
    /// TLS while this host has encryption disabled (or no certificate).
    TlsOff,
    /// The TLS handshake failed: no certificate, another CA's, a bad name, or garbage.
    Handshake,
    /// Neither TLS nor our protocol.
    Garbage,
    /// The handshake deadline passed.
    Deadline,
    /// Too many connections at once.
    OverCap,
}

impl Rejection {
    pub const ALL: [Rejection; 6] = [
        Rejection::Plaintext,
        Rejection::TlsOff,
        Rejection::Handshake,
        Rejection::Garbage,
        Rejection::Deadline,
        Rejection::OverCap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Plaintext => "plaintext",
            Rejection::TlsOff => "tls-off",
            Rejection::Handshake => "handshake",
            Rejection::Garbage => "garbage",
            Rejection::Deadline => "deadline",
            Rejection::OverCap => "over-cap",
        }
    }
}

/// Opens the target's end: negotiates by the first byte, runs the TLS handshake with
/// client authentication, and names the peer. The caller bounds it with its handshake
/// deadline; nothing is allocated here beyond the TLS state.
pub async fn accept(
    tcp: TcpStream,
    mode: Encryption,
    tls: Option<&Tls>,
) -> Result<(Stream, Protection), (Rejection, String)> {
    let _ = tcp.set_nodelay(true);
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => return Err((Rejection::Garbage, "closed before a byte".into())),
        Ok(_) => {}
        Err(e) => return Err((Rejection::Garbage, e.to_string())),
    }
    if first[0] == TLS_HANDSHAKE {
        let tls = match (mode, tls) {
            (Encryption::Disabled, _) | (_, None) => {
                return Err((Rejection::TlsOff, "TLS hello, encryption off here".into()))
            }
            (_, Some(t)) => t,
        };
        let s = tls
            .server
            .accept(Cork::new(tcp))
            .await
            .map_err(|e| (Rejection::Handshake, e.to_string()))?;
        let peer = s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| {
                let ee = webpki::EndEntityCert::try_from(c).ok()?;
                let name = ee.valid_dns_names().next()?.to_string();
                crate::names::validate("host", &name).ok()?;
                Some(name)
            });
        let (cork, conn) = s.into_inner();
        let stream = RecordStream::take_over(cork.into_inner(), conn)
            .map_err(|e| (Rejection::Handshake, e.to_string()))?;
        return match peer {
            Some(peer) => Ok((Box::new(stream), Protection::Tls { peer })),
            None => Err((
                Rejection::Handshake,
                "client certificate names no valid host".into(),
            )),
        };
    }
    if first[0] == super::proto::MAGIC[0] {
        return match mode {
            Encryption::Required => Err((
                Rejection::Plaintext,
                "plaintext, encryption required here".into(),
            )),
            _ => Ok((Box::new(tcp), Protection::Plaintext)),
        };
    }
    Err((Rejection::Garbage, format!("first byte {:#04x}", first[0])))
}

/// Counts rejected connections by reason, for a periodic summary instead of a log line
/// per connection (a flood must not fill the disk).
#[derive(Debug, Default)]
pub struct Rejections {
    counts: [AtomicU64; 6],
}

impl Rejections {
    pub fn record(&self, r: Rejection) {
        let i = Rejection::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the counts since the last call: the total and a "reason=N …" summary.
    pub fn take(&self) -> (u64, String) {
        let mut total = 0;
        let mut parts = Vec::new();
        for (i, r) in Rejection::ALL.iter().enumerate() {
            let n = self.counts[i].swap(0, Ordering::Relaxed);
            if n > 0 {
                total += n;
                parts.push(format!("{}={n}", r.as_str()));
            }
        }
        (total, parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in [
            Encryption::Required,
            Encryption::Opportunistic,
            Encryption::Disabled,
        ] {
            assert_eq!(m.to_string().parse::<Encryption>(), Ok(m));
        }
        assert!("on".parse::<Encryption>().is_err());
        assert_eq!(Encryption::default(), Encryption::Required);
    }

    #[test]
    fn rejections_summarise_and_reset() {
        let r = Rejections::default();
        assert_eq!(r.take(), (0, String::new()));
        r.record(Rejection::Plaintext);
        r.record(Rejection::Plaintext);
        r.record(Rejection::OverCap);
        assert_eq!(r.take(), (3, "plaintext=2 over-cap=1".to_string()));
        assert_eq!(r.take().0, 0);
    }
}

#[cfg(test)]
mod negotiation_tests {
    use super::*;

    fn proto_magic() -> [u8; 4] {
        super::super::proto::MAGIC
    }

    fn creds(dir: &std::path::Path, name: &str) -> Tls {
        crate::pki::init(dir).unwrap();
        crate::pki::issue(dir, name).unwrap();
        Tls::new(&crate::pki::load(dir, name).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn opportunistic_falls_back_only_when_the_peer_refuses_tls() {
        let dir = tempfile::tempdir().unwrap();
        let a = creds(dir.path(), "a");
        let b = creds(dir.path(), "b");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..2 {
                let (s, _) = l.accept().await.unwrap();
                out.push(accept(s, Encryption::Disabled, Some(&b)).await.map(|x| x.1));
            }
            out
        });
        let t = Duration::from_secs(5);
        let (mut s, p) = connect(addr, "b", Encryption::Opportunistic, Some(&a), t)
            .await
            .unwrap();
        assert_eq!(p, Protection::Plaintext);
        tokio::io::AsyncWriteExt::write_all(&mut s, &proto_magic())
            .await
            .unwrap();
        let got = server.await.unwrap();
        assert_eq!(got[0].as_ref().unwrap_err().0, Rejection::TlsOff);
        assert_eq!(got[1].as_ref().unwrap(), &Protection::Plaintext);
    }
}
