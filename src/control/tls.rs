//! The control plane across machines (adapter): an optional TCP listener on a daemon,
//! TLS 1.3 with mutual authentication by the fabric CA ([`crate::pki`]), and the
//! operator's client side.
//!
//! Unix sockets exist on one machine only; a daemon on another machine is reached over
//! TCP. The daemon presents its host certificate, so the CLI checks that it reached the
//! host it named; the CLI presents an operator certificate (`<name>.operator`, client
//! authentication only), and the daemon accepts no other: not another CA's, not none,
//! and not a host's (a host proves itself on the vMotion network, not here). Only after
//! that does a byte of the control protocol cross, the same JSON lines as on the Unix
//! socket.
//!
//! A peer is a stranger until its handshake is done: it gets a bounded number of
//! concurrent connections (more are closed at once), a handshake deadline, no buffer
//! beyond what TLS needs for the handshake, and no log line above DEBUG; the refusals
//! are counted ([`ControlListener::refused`]).

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::Resumption;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, StreamOwned};
use tokio_rustls::TlsAcceptor;

use crate::pki::{self, HostCredentials};

/// Default handshake deadline of an incoming control connection.
pub const DEFAULT_HANDSHAKE: Duration = Duration::from_secs(5);
/// Default cap on concurrent control connections over TCP (handshaking or served).
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;
/// How long the CLI waits for the TCP connection and for the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of building the control plane's TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum ControlTlsError {
    #[error("bad fabric CA certificate")]
    Ca(#[source] rustls::Error),
    #[error("cannot build the client verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("bad certificate or key")]
    Cert(#[source] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(creds: &HostCredentials) -> Result<Arc<RootCertStore>, ControlTlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(creds.ca.clone()).map_err(ControlTlsError::Ca)?;
    Ok(Arc::new(roots))
}

/// A daemon's side: its certificate, and the fabric CA operators' certificates must
/// chain to.
pub struct ServerTls {
    name: String,
    acceptor: TlsAcceptor,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("name", &self.name)
            .finish()
    }
}

impl ServerTls {
    pub fn new(creds: &HostCredentials) -> Result<ServerTls, ControlTlsError> {
        let provider = provider();
        let inner = WebPkiClientVerifier::builder_with_provider(roots(creds)?, provider.clone())
            .build()
            .map_err(ControlTlsError::Verifier)?;
        let verifier = Arc::new(OperatorVerifier { inner });
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ControlTlsError::Cert)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![creds.cert.clone()], creds.key.clone_key())
            .map_err(ControlTlsError::Cert)?;
        // One request per connection: nothing to resume, nothing to keep per client.
        cfg.session_storage = Arc::new(NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok(ServerTls {
            name: creds.name.clone(),
            acceptor: TlsAcceptor::from(Arc::new(cfg)),
        })
    }

    /// Runs the handshake and returns the stream with the operator's name, or why the
    /// peer was refused. The caller bounds it with the handshake deadline.
    pub async fn accept(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> Result<
        (
            tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
            String,
        ),
        String,
    > {
        let s = self.acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let operator = s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| {
                let ee = webpki::EndEntityCert::try_from(c).ok()?;
                let id = ee.valid_dns_names().next()?.to_string();
                pki::operator_of(&id).map(str::to_string)
            });
        operator
            .map(|op| (s, op))
            .ok_or_else(|| "the client certificate is not an operator's".to_string())
    }
}

/// The fabric CA's check, then: the certificate names an operator. A refusal happens
/// inside the handshake, so the peer gets a TLS alert, not a silent close.
#[derive(Debug)]
struct OperatorVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl rustls::server::danger::ClientCertVerifier for OperatorVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &pki_types::CertificateDer<'_>,
        intermediates: &[pki_types::CertificateDer<'_>],
        now: pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let is_operator = webpki::EndEntityCert::try_from(end_entity)
            .ok()
            .and_then(|ee| {
                let id = ee.valid_dns_names().next()?.to_string();
                pki::operator_of(&id).map(drop)
            })
            .is_some();
        if is_operator {
            Ok(ok)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The operator's side (the CLI): its certificate and the fabric CA daemons' must chain
/// to. Built once per process; each connection checks the daemon's name.
#[derive(Clone)]
pub struct ClientTls {
    operator: String,
    config: Arc<ClientConfig>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("operator", &self.operator)
            .finish()
    }
}

impl ClientTls {
    pub fn new(creds: &HostCredentials) -> Result<ClientTls, ControlTlsError> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ControlTlsError::Cert)?
            .with_root_certificates(roots(creds)?)
            .with_client_auth_cert(vec![creds.cert.clone()], creds.key.clone_key())
            .map_err(ControlTlsError::Cert)?;
        cfg.resumption = Resumption::disabled();
        Ok(ClientTls {
            operator: creds.name.clone(),
            config: Arc::new(cfg),
        })
    }

    /// The operator's credentials from `dir` (`<operator>.operator.pem`, `.key` and
    /// `ca.pem`).
    pub fn load(dir: &Path, operator: &str) -> Result<ClientTls, super::ControlError> {
        let creds = pki::load_operator(dir, operator)?;
        ClientTls::new(&creds).map_err(|e| super::ControlError::Credentials(e.to_string()))
    }

    /// Connects to daemon `name` at `addr` and completes the handshake, so that a daemon
    /// that cannot prove it is `name` is an error here, before a request is sent.
    /// (Whether the daemon accepts our certificate shows on the first read: TLS 1.3
    /// ends the client's part of the handshake first.)
    pub fn connect(
        &self,
        name: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<StreamOwned<ClientConnection, TcpStream>, super::ControlError> {
        use super::ControlError;
        let remote = |why: String| ControlError::RemoteTls {
            name: name.to_string(),
            addr,
            why,
        };
        let server_name =
            pki_types::ServerName::try_from(name.to_string()).map_err(|e| remote(e.to_string()))?;
        let mut tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|source| {
            ControlError::RemoteConnect {
                name: name.to_string(),
                addr,
                source,
            }
        })?;
        let _ = tcp.set_nodelay(true);
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        let mut conn = ClientConnection::new(self.config.clone(), server_name)
            .map_err(|e| remote(e.to_string()))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)
                .map_err(|e| remote_error(name, addr, e))?;
        }
        tcp.set_write_timeout(None)?;
        Ok(StreamOwned::new(conn, tcp))
    }
}

/// Names what went wrong on a TLS connection to daemon `name`: a daemon that refused our
/// certificate, one that could not prove who it is, or a plain I/O failure.
pub fn remote_error(name: &str, addr: SocketAddr, e: io::Error) -> super::ControlError {
    use super::ControlError;
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned();
    match tls {
        Some(rustls::Error::AlertReceived(alert)) => ControlError::Refused {
            name: name.to_string(),
            addr,
            alert: format!("{alert:?}"),
        },
        Some(rustls::Error::InvalidCertificate(why)) => ControlError::RemoteTls {
            name: name.to_string(),
            addr,
            why: format!("it did not prove it is {name} of this fabric (its certificate: {why:?})"),
        },
        Some(other) => ControlError::RemoteTls {
            name: name.to_string(),
            addr,
            why: other.to_string(),
        },
        None => match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                ControlError::RemoteTls {
                    name: name.to_string(),
                    addr,
                    why: "it closed the connection during the TLS handshake (is this the \
                          control port of a vfabric daemon?)"
                        .into(),
                }
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ControlError::RemoteTls {
                name: name.to_string(),
                addr,
                why: "the TLS handshake timed out".into(),
            },
            _ => ControlError::Io(e),
        },
    }
}

/// Where a control listener binds: `[NETNS:]IP:PORT`. With a namespace, the socket is
/// opened there (a machine's management network), whatever namespace the daemon runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    pub netns: Option<String>,
    pub addr: SocketAddr,
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| format!("{s:?}: {why} (expected [NETNS:]IP:PORT)");
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr { netns: None, addr });
        }
        let (ns, rest) = s.split_once(':').ok_or_else(|| bad("no port"))?;
        let addr = rest
            .parse::<SocketAddr>()
            .map_err(|_| bad("not an IP:PORT"))?;
        if !valid_netns(ns) {
            return Err(bad("bad namespace name"));
        }
        Ok(ListenAddr {
            netns: Some(ns.to_string()),
            addr,
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.netns {
            Some(ns) => write!(f, "{ns}:{}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// A namespace name becomes a path (/run/netns/NAME): no separator, no `.` or `..`.
fn valid_netns(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 64
        && ns != "."
        && ns != ".."
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Binds a TCP listener at `at`, inside its namespace if it names one (from a
/// short-lived thread, so the daemon's own threads stay where they are).
pub fn bind(at: &ListenAddr) -> io::Result<tokio::net::TcpListener> {
    let addr = at.addr;
    let std_listener = match &at.netns {
        None => std::net::TcpListener::bind(addr)?,
        Some(ns) => {
            let path = Path::new("/run/netns").join(ns);
            std::thread::spawn(move || {
                crate::sys::packet::enter_netns(&path).map_err(|e| {
                    io::Error::new(e.kind(), format!("namespace {}: {e}", path.display()))
                })?;
                std::net::TcpListener::bind(addr)
            })
            .join()
            .map_err(|_| io::Error::other("namespace thread panicked"))??
        }
    };
    std_listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(std_listener)
}

/// Limits on strangers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A peer must finish its TLS handshake (and prove it is an operator) within this.
    pub handshake: Duration,
    /// Most control connections over TCP at once; more are closed at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake: DEFAULT_HANDSHAKE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// A daemon's TCP control listener: the socket, the daemon's TLS identity, the limits,
/// and the count of refused connections.
pub struct ControlListener {
    pub listener: tokio::net::TcpListener,
    pub tls: Arc<ServerTls>,
    pub limits: Limits,
    refused: Arc<AtomicU64>,
}

impl ControlListener {
    pub fn new(listener: tokio::net::TcpListener, tls: Arc<ServerTls>, limits: Limits) -> Self {
        ControlListener {
            listener,
            tls,
            limits,
            refused: Arc::default(),
        }
    }

    /// Connections closed before they were authenticated (over the cap, past the
    /// deadline, or with no operator certificate of this fabric), since the start.
    pub fn refused(&self) -> Arc<AtomicU64> {
        self.refused.clone()
    }

    pub(super) fn count_refusal(refused: &AtomicU64) {
        refused.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{self as control, ControlError, Endpoint, Progress};
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn listen_addresses_parse_with_or_without_a_namespace() {
        let a: ListenAddr = "127.0.0.1:7000".parse().unwrap();
        assert_eq!((a.netns, a.addr.port()), (None, 7000));
        let a: ListenAddr = "vf-mb:192.168.50.2:7105".parse().unwrap();
        assert_eq!(a.netns.as_deref(), Some("vf-mb"));
        assert_eq!(a.to_string(), "vf-mb:192.168.50.2:7105");
        for bad in [
            "",
            "7000",
            "../x:1.2.3.4:5",
            "a/b:1.2.3.4:5",
            "ns:1.2.3.4",
            "..:1.2.3.4:5",
        ] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn remote_lists_parse_and_refuse_what_is_wrong() {
        let r =
            control::parse_remotes("silo105=10.0.0.2:7105, silo106=10.0.0.2:7106\n# x\n").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, "silo106");
        assert!(control::parse_remotes("").unwrap().is_empty());
        for bad in [
            "silo105",
            "silo105=x",
            "../x=1.2.3.4:5",
            "a=1.2.3.4:5 a=1.2.3.4:6",
        ] {
            assert!(control::parse_remotes(bad).is_err(), "{bad}");
        }
    }

    /// A fabric (CA, host "h1", operator "admin") and a stranger's CA with its own
    /// operator, in one temporary directory.
    struct Pki {
        _dir: tempfile::TempDir,
        fabric: std::path::PathBuf,
        other: std::path::PathBuf,
    }

    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let fabric = dir.path().join("fabric");
        let other = dir.path().join("other");
        for d in [&fabric, &other] {
            crate::pki::init(d).unwrap();
            crate::pki::issue(d, "h1").unwrap();
            crate::pki::issue_operator(d, "admin").unwrap();
        }
        Pki {
            _dir: dir,
            fabric,
            other,
        }
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    enum Req {
        Echo(String),
    }

    /// Serves a test API on a Unix socket and on TCP+TLS as host h1; returns the TCP
    /// address, the refusal count and a stopper.
    async fn serve(
        p: &Pki,
        limits: Limits,
    ) -> (
        SocketAddr,
        Arc<AtomicU64>,
        tokio::sync::oneshot::Sender<()>,
        tempfile::TempDir,
    ) {
        let sockdir = tempfile::tempdir().unwrap();
        let unix = control::bind(&sockdir.path().join("h1.sock")).unwrap();
        let tls = Arc::new(ServerTls::new(&crate::pki::load(&p.fabric, "h1").unwrap()).unwrap());
        let l = bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let listener = ControlListener::new(l, tls, limits);
        let refused = listener.refused();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(control::serve_with(
            unix,
            Some(listener),
            |r: Req, _: Progress| async move {
                match r {
                    Req::Echo(s) => Ok(serde_json::json!(s)),
                }
            },
            None,
            async {
                let _ = stopped.await;
            },
        ));
        (addr, refused, stop, sockdir)
    }

    fn echo(tls: &ClientTls, name: &str, addr: SocketAddr) -> Result<String, ControlError> {
        let mut s = tls.connect(name, addr, Duration::from_secs(5))?;
        s.write_all(b"{\"Echo\":\"hi\"}\n")?;
        let mut text = String::new();
        let r = s.read_to_string(&mut text);
        if let Err(e) = r {
            // A refusal arrives as an alert on the first read (TLS 1.3).
            return Err(remote_error(name, addr, e));
        }
        Ok(text)
    }

    fn mixed(ca_from: &Path, cert_from: &Path, id: &str) -> ClientTls {
        let ca = crate::pki::load(ca_from, "h1").unwrap().ca;
        let mut c = if id.ends_with(crate::pki::OPERATOR_SUFFIX) {
            crate::pki::load_operator(cert_from, "admin").unwrap()
        } else {
            crate::pki::load(cert_from, id).unwrap()
        };
        c.ca = ca;
        ClientTls::new(&c).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_an_operator_of_the_fabric_gets_an_answer() {
        let p = pki();
        let (addr, refused, stop, _d) = serve(&p, Limits::default()).await;
        let fabric = p.fabric.clone();
        let other = p.other.clone();
        tokio::task::spawn_blocking(move || {
            let admin = ClientTls::load(&fabric, "admin").unwrap();
            let text = echo(&admin, "h1", addr).unwrap();
            assert!(text.contains("\"ok\":\"hi\""), "{text}");
            // The daemon must prove it is the host the CLI named.
            match echo(&admin, "h2", addr) {
                Err(ControlError::RemoteTls { why, .. }) => assert!(why.contains("prove"), "{why}"),
                other => panic!("unexpected {other:?}"),
            }
            // Another CA's operator (trusting ours, so the refusal is the daemon's).
            let stranger = mixed(&fabric, &other, "admin.operator");
            let e = echo(&stranger, "h1", addr).unwrap_err();
            assert!(matches!(e, ControlError::Refused { .. }), "{e:?}");
            let line = crate::errors::chain(&e);
            assert!(
                !line.contains('\n') && line.contains("refused this CLI's certificate"),
                "{line}"
            );
            // A host's certificate of the right CA is not an operator's.
            let host = mixed(&fabric, &fabric, "h1");
            let e = echo(&host, "h1", addr).unwrap_err();
            assert!(matches!(e, ControlError::Refused { .. }), "{e:?}");
            // No certificate at all.
            let roots = super::roots(&crate::pki::load(&fabric, "h1").unwrap()).unwrap();
            let cfg = ClientConfig::builder_with_provider(super::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let anon = ClientTls {
                operator: "-".into(),
                config: Arc::new(cfg),
            };
            assert!(matches!(
                echo(&anon, "h1", addr),
                Err(ControlError::Refused { .. })
            ));
            // Plaintext JSON gets nothing back.
            let mut raw = std::net::TcpStream::connect(addr).unwrap();
            raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            raw.write_all(b"{\"Echo\":\"hi\"}\n").unwrap();
            let mut buf = Vec::new();
            let _ = raw.read_to_end(&mut buf);
            assert!(!String::from_utf8_lossy(&buf).contains("hi"));
            // The library's call path says the same, on one line.
            let _ = Endpoint::Remote {
                name: "h1".into(),
                addr,
            };
        })
        .await
        .unwrap();
        assert!(refused.load(Ordering::Relaxed) >= 4);
        stop.send(()).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn strangers_meet_a_deadline_and_a_cap() {
        let p = pki();
        let limits = Limits {
            handshake: Duration::from_millis(300),
            max_connections: 2,
        };
        let (addr, refused, stop, _d) = serve(&p, limits).await;
        let fabric = p.fabric.clone();
        tokio::task::spawn_blocking(move || {
            // Two silent strangers fill the slots; a third is closed at once.
            let t0 = std::time::Instant::now();
            let mut idle: Vec<std::net::TcpStream> = (0..2)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            std::thread::sleep(Duration::from_millis(50));
            let mut third = std::net::TcpStream::connect(addr).unwrap();
            third
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut b = [0u8; 1];
            assert!(matches!(third.read(&mut b), Ok(0) | Err(_)));
            assert!(
                t0.elapsed() < Duration::from_millis(250),
                "{:?}",
                t0.elapsed()
            );
            // The silent ones are closed at the deadline, not before.
            for s in &mut idle {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
            }
            let waited = t0.elapsed();
            assert!(waited >= Duration::from_millis(280), "{waited:?}");
            assert!(waited < Duration::from_secs(3), "{waited:?}");
            // Their slots are free again for the operator.
            let admin = ClientTls::load(&fabric, "admin").unwrap();
            assert!(echo(&admin, "h1", addr).unwrap().contains("hi"));
        })
        .await
        .unwrap();
        assert_eq!(refused.load(Ordering::Relaxed), 3);
        stop.send(()).unwrap();
    }
}
