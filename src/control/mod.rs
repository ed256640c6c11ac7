//! Control plane: a Unix socket per daemon, one JSON request line in, JSON reply lines out.
//!
//! The socket lives at `<runtime dir>/<name>.sock` (runtime dir: `$VFABRIC_RUN_DIR`, else
//! `/run/vfabric`), mode 0600 in a 0700 directory. A request is one line of JSON; the
//! server answers with zero or more [`Reply::Progress`] lines and then exactly one
//! [`Reply::Ok`] or [`Reply::Err`]. Unix sockets ignore network namespaces, so the CLI
//! reaches daemons in any namespace without `ip netns exec`.
//!
//! Requests are typed: each action is a type implementing [`Request`], which names the
//! daemon's request enum it travels in and the type of its reply, so a caller and a
//! handler cannot disagree about what comes back ([`request`] on the client side,
//! [`Request::reply`] on the daemon's). Errors stay enums until they reach the socket,
//! where they become their one-line text.
//!
//! Every daemon also serves its event stream ([`crate::events`]): the request line
//! `{"subscribe":{}}` is answered by one [`Reply::Progress`] line (`{"subscribed":
//! SOURCE}`), then one [`Reply::Event`] line per event for as long as the client reads
//! fast enough; a client whose queue fills is dropped with a final [`Reply::Err`].
//!
//! A daemon on another machine is reached over TCP instead ([`tls`]): the same lines
//! inside TLS 1.3, both ends authenticated by the fabric CA. Which daemons are remote,
//! and where, is named by `$VFABRIC_REMOTE` (`NAME=IP:PORT[,NAME=IP:PORT…]`) or, when it
//! is unset, by the file `<run dir>/remotes` (the same entries, one a line); an
//! [`Endpoint`] is either a socket path or such a remote daemon.

pub mod tls;

use std::fmt;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, Semaphore};

use crate::events::{EventBus, Record, SUBSCRIBER_QUEUE};

/// Longest request or reply line accepted, in bytes.
pub const MAX_LINE: usize = 1 << 20;
/// How long a daemon waits for a client's request line, and a client for a reply line
/// (unless it asks for longer, as a migration does).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// One action of a daemon's control API: `Api` is the daemon's request enum it travels
/// in, `Reply` what the daemon answers.
pub trait Request: Sized {
    type Api: Serialize + DeserializeOwned + From<Self>;
    type Reply: Serialize + DeserializeOwned;

    /// The daemon's side: turns the handler's typed result into the final reply line's
    /// value; the error becomes its one-line text here, at the socket.
    fn reply<E: std::error::Error>(r: Result<Self::Reply, E>) -> Result<serde_json::Value, String> {
        match r {
            Ok(v) => serde_json::to_value(v).map_err(|e| e.to_string()),
            Err(e) => Err(error_line(&e)),
        }
    }
}

/// Declares request types of an API enum: `api_requests!(HostRequest: Info => HostInfo, …)`
/// implements [`Request`] for each, and wraps each in the enum variant of the same name.
#[macro_export]
macro_rules! api_requests {
    ($api:ident : $($req:ident => $reply:ty),+ $(,)?) => {
        $(
            impl $crate::control::Request for $req {
                type Api = $api;
                type Reply = $reply;
            }
            impl From<$req> for $api {
                fn from(r: $req) -> $api {
                    $api::$req(r)
                }
            }
        )+
    };
}

/// An error and its causes on one line, as it crosses the socket.
pub use crate::errors::chain as error_line;

/// The request line that opens an event stream (any daemon).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    pub subscribe: SubscribeOptions,
}

/// Options of [`Subscribe`] (none yet: every event of the daemon).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SubscribeOptions {}

/// First line of an event stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Subscribed {
    pub subscribed: String,
}

/// Errors of the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach {path}: is the daemon running?")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {0} is in use by a running daemon")]
    InUse(PathBuf),
    #[error("control connection failed")]
    Io(#[from] std::io::Error),
    #[error("bad control message: {0}")]
    Protocol(String),
    /// The connection ended before the final reply: the daemon stopped or died.
    #[error("daemon closed the connection without a reply")]
    Closed,
    /// The daemon answered with an error; the text is the daemon's one-line message.
    #[error("{0}")]
    Remote(String),
    #[error("bad list of remote daemons in {from}: {why}")]
    Remotes { from: String, why: String },
    #[error("daemons on other machines are out of reach")]
    Pki(#[from] crate::pki::PkiError),
    #[error("bad operator credentials: {0}")]
    Credentials(String),
    #[error("cannot reach {addr} over TCP")]
    RemoteConnect {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {addr} failed: {why}")]
    RemoteTls {
        name: String,
        addr: SocketAddr,
        why: String,
    },
    /// The daemon refused our certificate (another CA's, or not an operator's).
    #[error(
        "{addr} refused this CLI's certificate (TLS alert {alert}): an operator \
             certificate of this fabric's CA is needed (`vfabric pki issue-operator`)"
    )]
    Refused {
        name: String,
        addr: SocketAddr,
        alert: String,
    },
}

/// Where a daemon's control API is: its Unix socket on this machine, or a daemon on
/// another machine over TCP and TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Local(PathBuf),
    Remote { name: String, addr: SocketAddr },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Local(p) => write!(f, "{}", p.display()),
            Endpoint::Remote { name, addr } => write!(f, "{name} at {addr} (TLS)"),
        }
    }
}

impl From<&Path> for Endpoint {
    fn from(p: &Path) -> Endpoint {
        Endpoint::Local(p.to_path_buf())
    }
}

impl From<&PathBuf> for Endpoint {
    fn from(p: &PathBuf) -> Endpoint {
        Endpoint::Local(p.clone())
    }
}

impl From<PathBuf> for Endpoint {
    fn from(p: PathBuf) -> Endpoint {
        Endpoint::Local(p)
    }
}

impl From<&Endpoint> for Endpoint {
    fn from(e: &Endpoint) -> Endpoint {
        e.clone()
    }
}

/// The environment variable naming remote daemons: `NAME=IP:PORT[,NAME=IP:PORT…]`.
pub const REMOTE_ENV: &str = "VFABRIC_REMOTE";
/// The environment variable naming the operator whose certificate the CLI presents
/// (default `admin`: `<pki dir>/admin.operator.pem`).
pub const OPERATOR_ENV: &str = "VFABRIC_OPERATOR";
/// The operator when `$VFABRIC_OPERATOR` is unset.
pub const DEFAULT_OPERATOR: &str = "admin";
/// The file of remote daemons in the run directory, read when `$VFABRIC_REMOTE` is unset.
pub const REMOTES_FILE: &str = "remotes";
/// Most remote daemons one list may name.
pub const MAX_REMOTES: usize = 256;

/// Parses a list of remote daemons: `NAME=IP:PORT` entries separated by commas,
/// spaces or newlines; `#` starts a comment to the end of its line.
pub fn parse_remotes(text: &str) -> Result<Vec<(String, SocketAddr)>, String> {
    let mut out: Vec<(String, SocketAddr)> = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        for entry in line
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|e| !e.is_empty())
        {
            let (name, addr) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?} is not NAME=IP:PORT"))?;
            crate::names::validate("daemon", name).map_err(|e| e.to_string())?;
            let addr: SocketAddr = addr
                .parse()
                .map_err(|_| format!("{entry:?}: {addr:?} is not IP:PORT"))?;
            if out.iter().any(|(n, _)| n == name) {
                return Err(format!("{name} is named twice"));
            }
            if out.len() == MAX_REMOTES {
                return Err(format!("more than {MAX_REMOTES} entries"));
            }
            out.push((name.to_string(), addr));
        }
    }
    Ok(out)
}

/// The remote daemons this CLI knows: `$VFABRIC_REMOTE`, else `<run dir>/remotes`.
pub fn remotes() -> Result<Vec<(String, SocketAddr)>, ControlError> {
    let (from, text) = match std::env::var(REMOTE_ENV) {
        Ok(v) => (REMOTE_ENV.to_string(), v),
        Err(_) => {
            let path = runtime_dir().join(REMOTES_FILE);
            match std::fs::read_to_string(&path) {
                Ok(t) => (path.display().to_string(), t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => {
                    return Err(ControlError::Remotes {
                        from: path.display().to_string(),
                        why: e.to_string(),
                    })
                }
            }
        }
    };
    parse_remotes(&text).map_err(|why| ControlError::Remotes { from, why })
}

/// Where daemon `name` is: a remote daemon if the list names it, else its socket here.
pub fn endpoint(name: &str) -> Result<Endpoint, ControlError> {
    Ok(match remotes()?.into_iter().find(|(n, _)| n == name) {
        Some((name, addr)) => Endpoint::Remote { name, addr },
        None => Endpoint::Local(socket_path(name)),
    })
}

/// The operator credentials of this process (`<run dir>/pki/<operator>.operator.*`),
/// loaded at the first remote call.
fn client_tls() -> Result<tls::ClientTls, ControlError> {
    static CACHE: OnceLock<tls::ClientTls> = OnceLock::new();
    if let Some(c) = CACHE.get() {
        return Ok(c.clone());
    }
    let operator = std::env::var(OPERATOR_ENV).unwrap_or_else(|_| DEFAULT_OPERATOR.to_string());
    let c = tls::ClientTls::load(&crate::pki::default_dir(), &operator)?;
    Ok(CACHE.get_or_init(|| c).clone())
}

/// One client connection, local or remote.
enum Conn {
    Unix(std::os::unix::net::UnixStream),
    Tls {
        name: String,
        addr: SocketAddr,
        s: Box<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>,
    },
}

impl Conn {
    fn open(to: &Endpoint) -> Result<Conn, ControlError> {
        match to {
            Endpoint::Local(path) => std::os::unix::net::UnixStream::connect(path)
                .map(Conn::Unix)
                .map_err(|source| ControlError::Connect {
                    path: path.clone(),
                    source,
                }),
            Endpoint::Remote { name, addr } => {
                let s = client_tls()?.connect(name, *addr, tls::CONNECT_TIMEOUT)?;
                Ok(Conn::Tls {
                    name: name.clone(),
                    addr: *addr,
                    s: Box::new(s),
                })
            }
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tls { s, .. } => s.sock.set_read_timeout(t),
        }
    }

    fn closer(&self) -> std::io::Result<Closer> {
        Ok(match self {
            Conn::Unix(s) => Closer::Unix(s.try_clone()?),
            Conn::Tls { s, .. } => Closer::Tcp(s.sock.try_clone()?),
        })
    }

    /// Names an I/O failure: over TLS, a refused certificate is said as such, and an
    /// abrupt end is the daemon closing without a reply.
    fn error(&self, e: std::io::Error) -> ControlError {
        match self {
            Conn::Unix(_) => ControlError::Io(e),
            Conn::Tls { name, addr, .. } => match tls::remote_error(name, *addr, e) {
                ControlError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    ControlError::Closed
                }
                other => other,
            },
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tls { s, .. } => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tls { s, .. } => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tls { s, .. } => s.flush(),
        }
    }
}

/// Ends an event stream from another thread.
#[derive(Debug)]
pub enum Closer {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Closer {
    pub fn shutdown(&self) {
        let _ = match self {
            Closer::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Closer::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// One reply line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Progress(serde_json::Value),
    /// One event of a subscription.
    Event(Record),
    Ok(serde_json::Value),
    Err(String),
}

/// The runtime directory holding the daemons' sockets.
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("VFABRIC_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/vfabric"))
}

/// The control socket path of daemon `name`.
pub fn socket_path(name: &str) -> PathBuf {
    runtime_dir().join(format!("{name}.sock"))
}

/// Binds a control socket at `path` with mode 0600. A stale socket file left by a dead
/// daemon is replaced; a live one is refused.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    crate::sys::clear_socket_path(path, |p| std::os::unix::net::UnixStream::connect(p).is_ok())
        .map_err(|e| match e {
            crate::sys::SocketPathError::InUse => ControlError::InUse(path.to_path_buf()),
            crate::sys::SocketPathError::Io(source) => bind_err(source),
        })?;
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Sends progress lines back to the client while a long request runs.
#[derive(Clone)]
pub struct Progress(mpsc::UnboundedSender<Reply>);

impl Progress {
    /// Queues one progress line; a client that went away is ignored.
    pub fn send<T: Serialize>(&self, value: &T) {
        if let Ok(v) = serde_json::to_value(value) {
            let _ = self.0.send(Reply::Progress(v));
        }
    }
}

/// Serves requests on `listener` until `shutdown` resolves. Each connection carries one
/// request of type `Req`; `handler` returns the final value or a one-line error text.
/// Without an event bus, a subscription is refused.
pub async fn serve<Req, H, Fut, S>(listener: UnixListener, handler: H, shutdown: S)
where
    Req: DeserializeOwned + Send + 'static,
    H: Fn(Req, Progress) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<serde_json::Value, String>> + Send + 'static,
    S: Future<Output = ()>,
{
    serve_with(listener, None, handler, None, shutdown).await
}

/// [`serve`], also serving subscriptions to `events` (if given), and the same API over
/// TCP and TLS on `tcp` (if given).
pub async fn serve_with<Req, H, Fut, S>(
    listener: UnixListener,
    tcp: Option<tls::ControlListener>,
    handler: H,
    events: Option<EventBus>,
    shutdown: S,
) where
    Req: DeserializeOwned + Send + 'static,
    H: Fn(Req, Progress) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<serde_json::Value, String>> + Send + 'static,
    S: Future<Output = ()>,
{
    let tcp_task = tcp.map(|t| tokio::spawn(serve_tcp(t, handler.clone(), events.clone())));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors, most likely: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let handler = handler.clone();
                let events = events.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_one::<Req, H, Fut, _>(stream, handler, events).await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
        }
    }
    if let Some(t) = tcp_task {
        t.abort();
    }
}

/// Serves the TCP listener: a stranger gets a slot under the cap, then must finish the
/// TLS handshake with an operator certificate before the deadline; until then nothing
/// of the control protocol is read, and a refusal is counted and logged at DEBUG only.
async fn serve_tcp<Req, H, Fut>(t: tls::ControlListener, handler: H, events: Option<EventBus>)
where
    Req: DeserializeOwned + Send + 'static,
    H: Fn(Req, Progress) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<serde_json::Value, String>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(t.limits.max_connections.max(1)));
    let refused = t.refused();
    loop {
        let (tcp, peer) = match t.listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tls::ControlListener::count_refusal(&refused);
            tracing::debug!(%peer, "control connection over the cap: closed");
            continue;
        };
        let (handler, events, tls, refused) = (
            handler.clone(),
            events.clone(),
            t.tls.clone(),
            refused.clone(),
        );
        let deadline = t.limits.handshake;
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tcp.set_nodelay(true);
            let (stream, operator) = match tokio::time::timeout(deadline, tls.accept(tcp)).await {
                Ok(Ok(x)) => x,
                Ok(Err(why)) => {
                    tls::ControlListener::count_refusal(&refused);
                    tracing::debug!(%peer, why, "control connection refused");
                    return;
                }
                Err(_) => {
                    tls::ControlListener::count_refusal(&refused);
                    tracing::debug!(%peer, "control handshake deadline passed");
                    return;
                }
            };
            tracing::debug!(%peer, operator, "control connection authenticated");
            if let Err(e) = serve_one::<Req, H, Fut, _>(stream, handler, events).await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn serve_one<Req, H, Fut, St>(
    stream: St,
    handler: H,
    events: Option<EventBus>,
) -> std::io::Result<()>
where
    Req: DeserializeOwned,
    H: Fn(Req, Progress) -> Fut,
    Fut: Future<Output = Result<serde_json::Value, String>> + Send + 'static,
    St: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = tokio::io::BufReader::new(rd).take(MAX_LINE as u64);
    let mut line = String::new();
    // A client that connects and says nothing does not keep its descriptor forever.
    tokio::time::timeout(DEFAULT_TIMEOUT, rd.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    if serde_json::from_str::<Subscribe>(line.trim()).is_ok() {
        return stream_events(events, wr).await;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    match serde_json::from_str::<Req>(line.trim()) {
        Ok(req) => {
            let fut = handler(req, Progress(tx.clone()));
            tokio::spawn(async move {
                let reply = match fut.await {
                    Ok(v) => Reply::Ok(v),
                    Err(e) => Reply::Err(e),
                };
                let _ = tx.send(reply);
            });
        }
        Err(e) => {
            let _ = tx.send(Reply::Err(format!("bad request: {e}")));
        }
    }
    while let Some(reply) = rx.recv().await {
        let last = !matches!(reply, Reply::Progress(_));
        let mut text = serde_json::to_string(&reply).map_err(std::io::Error::other)?;
        text.push('\n');
        wr.write_all(text.as_bytes()).await?;
        if last {
            break;
        }
    }
    wr.shutdown().await
}

async fn write_reply<W: AsyncWrite + Unpin>(wr: &mut W, reply: &Reply) -> std::io::Result<()> {
    let mut text = serde_json::to_string(reply).map_err(std::io::Error::other)?;
    text.push('\n');
    wr.write_all(text.as_bytes()).await
}

/// Answers a subscription: an acknowledgement, then every event until the client goes
/// away or falls so far behind that the bus drops it.
async fn stream_events<W: AsyncWrite + Unpin>(
    events: Option<EventBus>,
    mut wr: W,
) -> std::io::Result<()> {
    let Some(bus) = events else {
        write_reply(
            &mut wr,
            &Reply::Err("this daemon has no event stream".into()),
        )
        .await?;
        return wr.shutdown().await;
    };
    let mut sub = bus.subscribe(SUBSCRIBER_QUEUE);
    let ack = Subscribed {
        subscribed: bus.source().to_string(),
    };
    write_reply(
        &mut wr,
        &Reply::Progress(serde_json::to_value(ack).map_err(std::io::Error::other)?),
    )
    .await?;
    while let Some(record) = sub.rx.recv().await {
        write_reply(&mut wr, &Reply::Event(record)).await?;
    }
    if sub.was_dropped() {
        let why = format!("events dropped: this subscriber fell {SUBSCRIBER_QUEUE} events behind");
        write_reply(&mut wr, &Reply::Err(why)).await?;
    }
    wr.shutdown().await
}

/// Sends `req` to the daemon at `to` (a socket path or an [`Endpoint`]) and waits for
/// its final reply, calling `on_progress` for each progress line. `timeout` bounds each
/// read (None: wait forever).
pub fn call<Req: Serialize>(
    to: impl Into<Endpoint>,
    req: &Req,
    timeout: Option<Duration>,
    mut on_progress: impl FnMut(serde_json::Value),
) -> Result<serde_json::Value, ControlError> {
    let mut stream = Conn::open(&to.into())?;
    stream.set_read_timeout(timeout)?;
    let mut text = serde_json::to_string(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    text.push('\n');
    if let Err(e) = stream
        .write_all(text.as_bytes())
        .and_then(|_| stream.flush())
    {
        return Err(stream.error(e));
    }
    let mut rd = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = match (&mut rd).take(MAX_LINE as u64).read_line(&mut line) {
            Ok(n) => n,
            Err(e) => return Err(rd.get_ref().error(e)),
        };
        if n == 0 {
            return Err(ControlError::Closed);
        }
        match serde_json::from_str::<Reply>(line.trim())
            .map_err(|e| ControlError::Protocol(e.to_string()))?
        {
            Reply::Progress(v) => on_progress(v),
            Reply::Event(_) => {
                return Err(ControlError::Protocol(
                    "an event where a reply was due".into(),
                ))
            }
            Reply::Ok(v) => return Ok(v),
            Reply::Err(e) => return Err(ControlError::Remote(e)),
        }
    }
}

/// Convenience: a call with the default read timeout and no progress.
pub fn call_simple<Req: Serialize, Resp: DeserializeOwned>(
    to: impl Into<Endpoint>,
    req: &Req,
) -> Result<Resp, ControlError> {
    let v = call(to, req, Some(DEFAULT_TIMEOUT), |_| {})?;
    serde_json::from_value(v).map_err(|e| ControlError::Protocol(e.to_string()))
}

/// Sends the typed request `req` to the daemon at `path` and returns its typed reply
/// (default read timeout).
pub fn request<R: Request>(to: impl Into<Endpoint>, req: R) -> Result<R::Reply, ControlError> {
    request_with_progress(to, req, Some(DEFAULT_TIMEOUT), |_: serde_json::Value| {})
}

/// [`request`] with progress lines of type `P` and a read timeout of choice (None: wait
/// forever). A progress line of another shape is skipped.
pub fn request_with_progress<R: Request, P: DeserializeOwned>(
    to: impl Into<Endpoint>,
    req: R,
    timeout: Option<Duration>,
    mut on_progress: impl FnMut(P),
) -> Result<R::Reply, ControlError> {
    let api: R::Api = req.into();
    let v = call(to, &api, timeout, |v| {
        if let Ok(p) = serde_json::from_value(v) {
            on_progress(p)
        }
    })?;
    serde_json::from_value(v).map_err(|e| ControlError::Protocol(e.to_string()))
}

/// A live event stream from one daemon (blocking reads).
pub struct EventStream {
    source: String,
    rd: BufReader<Conn>,
}

impl EventStream {
    /// Subscribes to the events of the daemon at `to` (a socket path or an
    /// [`Endpoint`]). Returns once the daemon has acknowledged: every event it publishes
    /// from then on is in the stream.
    pub fn open(to: impl Into<Endpoint>) -> Result<EventStream, ControlError> {
        let mut stream = Conn::open(&to.into())?;
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        let mut text = serde_json::to_string(&Subscribe::default())
            .map_err(|e| ControlError::Protocol(e.to_string()))?;
        text.push('\n');
        if let Err(e) = stream
            .write_all(text.as_bytes())
            .and_then(|_| stream.flush())
        {
            return Err(stream.error(e));
        }
        let mut rd = BufReader::new(stream);
        let source = match read_reply(&mut rd)? {
            Some(Reply::Progress(v)) => {
                serde_json::from_value::<Subscribed>(v)
                    .map_err(|e| ControlError::Protocol(e.to_string()))?
                    .subscribed
            }
            Some(Reply::Err(e)) => return Err(ControlError::Remote(e)),
            Some(_) => return Err(ControlError::Protocol("no subscription".into())),
            None => {
                return Err(ControlError::Protocol(
                    "daemon closed the connection without a reply".into(),
                ))
            }
        };
        rd.get_ref().set_read_timeout(None)?;
        Ok(EventStream { source, rd })
    }

    /// The daemon's name, as its records carry it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// A handle that ends the stream from another thread (`shutdown`).
    pub fn closer(&self) -> std::io::Result<Closer> {
        self.rd.get_ref().closer()
    }

    /// Bounds each wait for the next event (None: wait forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.rd.get_ref().set_read_timeout(timeout)
    }

    /// The next event; `Ok(None)` when the daemon ended the stream.
    pub fn next_event(&mut self) -> Result<Option<Record>, ControlError> {
        match read_reply(&mut self.rd)? {
            None => Ok(None),
            Some(Reply::Event(r)) => Ok(Some(r)),
            Some(Reply::Err(e)) => Err(ControlError::Remote(e)),
            Some(_) => Err(ControlError::Protocol("not an event".into())),
        }
    }
}

fn read_reply(rd: &mut BufReader<Conn>) -> Result<Option<Reply>, ControlError> {
    let mut line = String::new();
    let n = match rd.take(MAX_LINE as u64).read_line(&mut line) {
        Ok(n) => n,
        Err(e) => return Err(rd.get_ref().error(e)),
    };
    if n == 0 {
        return Ok(None);
    }
    serde_json::from_str::<Reply>(line.trim())
        .map(Some)
        .map_err(|e| ControlError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize)]
    enum TestReq {
        Echo(String),
        Count(u32),
        Fail,
    }

    #[tokio::test]
    async fn bind_changes_no_permissions_it_did_not_create() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("run");
        std::fs::create_dir(&parent).unwrap();
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A path through `..`, as a name like "../x" once made: the run directory is
        // created (0700, ours), its parent keeps its mode.
        let path = parent.join("vfabric").join("..").join("x.sock");
        let _listener = bind(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&parent), 0o755);
        assert_eq!(mode(&parent.join("vfabric")), 0o700);
        // An existing run directory keeps its mode too.
        let run = dir.path().join("open");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o751)).unwrap();
        let _l2 = bind(&run.join("y.sock")).unwrap();
        assert_eq!(mode(&run), 0o751);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn request_progress_and_reply_over_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("t.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            |req: TestReq, progress: Progress| async move {
                match req {
                    TestReq::Echo(s) => Ok(serde_json::json!(s)),
                    TestReq::Count(n) => {
                        for i in 0..n {
                            progress.send(&i);
                        }
                        Ok(serde_json::json!(n))
                    }
                    TestReq::Fail => Err("no room on host".to_string()),
                }
            },
            async {
                let _ = stop_rx.await;
            },
        ));
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            let v: String = call_simple(&p, &TestReq::Echo("hi".into())).unwrap();
            assert_eq!(v, "hi");
            let mut seen = vec![];
            let v = call(&p, &TestReq::Count(3), None, |v| seen.push(v)).unwrap();
            assert_eq!(v, serde_json::json!(3));
            assert_eq!(
                seen,
                vec![
                    serde_json::json!(0),
                    serde_json::json!(1),
                    serde_json::json!(2)
                ]
            );
            match call(&p, &TestReq::Fail, None, |_| {}) {
                Err(ControlError::Remote(e)) => assert_eq!(e, "no room on host"),
                other => panic!("unexpected {other:?}"),
            }
            // A second daemon may not steal a live socket.
            assert!(std::os::unix::net::UnixListener::bind(&p).is_err());
        })
        .await
        .unwrap();
        assert!(matches!(bind(&path), Err(ControlError::InUse(_))));
        stop_tx.send(()).unwrap();
        server.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscribers_get_every_event_and_a_slow_one_is_told_it_was_dropped() {
        use crate::events::{Event, EventBus};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let listener = bind(&path).unwrap();
        let bus = EventBus::new("silo104");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_with(
            listener,
            None,
            |_: TestReq, _: Progress| async { Ok(serde_json::Value::Null) },
            Some(bus.clone()),
            async {
                let _ = stop_rx.await;
            },
        ));
        let p = path.clone();
        let b = bus.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = EventStream::open(&p).unwrap();
            assert_eq!(s.source(), "silo104");
            // Subscribed once `open` returns: nothing published from now on is lost.
            let slow = EventStream::open(&p).unwrap();
            for i in 0..3 {
                b.emit(
                    i,
                    Event::FdbFlushed {
                        entries: i as usize,
                    },
                );
            }
            for i in 0..3 {
                let r = s.next_event().unwrap().unwrap();
                assert_eq!((r.t_us, r.source.as_str()), (i, "silo104"));
            }
            // `slow` reads nothing while the bus outruns its queue: it is dropped, the
            // publisher never waits, and the stream ends by saying so.
            for i in 0..(SUBSCRIBER_QUEUE as u64 * 4) {
                b.publish(i, Event::FdbFlushed { entries: 0 });
            }
            let mut slow = slow;
            let end = loop {
                match slow.next_event() {
                    Ok(Some(_)) => continue,
                    other => break other,
                }
            };
            match end {
                Err(ControlError::Remote(e)) => assert!(e.contains("dropped"), "{e}"),
                other => panic!("unexpected {other:?}"),
            }
            // The fast one is still subscribed.
            assert_eq!(s.next_event().unwrap().unwrap().t_us, 0);
        })
        .await
        .unwrap();
        stop_tx.send(()).unwrap();
        server.await.unwrap();
    }

    #[test]
    fn missing_daemon_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            call_simple::<_, serde_json::Value>(&dir.path().join("none.sock"), &1u8).unwrap_err();
        assert!(err.to_string().contains("is the daemon running?"), "{err}");
    }
}
