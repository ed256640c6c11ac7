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

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

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
    if let Some(dir) = path.parent() {
        // Directories made here are born 0700; one that exists is left as it is, since
        // this code changes no permissions on anything it did not create. (Setting the
        // mode afterwards would follow `..`: `<run dir>/../x.sock` once made /run 0700.)
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(bind_err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
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
    serve_events(listener, handler, None, shutdown).await
}

/// [`serve`], also serving subscriptions to `events`.
pub async fn serve_events<Req, H, Fut, S>(
    listener: UnixListener,
    handler: H,
    events: Option<EventBus>,
    shutdown: S,
) where
    Req: DeserializeOwned + Send + 'static,
    H: Fn(Req, Progress) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<serde_json::Value, String>> + Send + 'static,
    S: Future<Output = ()>,
{
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
                    if let Err(e) = serve_one::<Req, H, Fut>(stream, handler, events).await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
        }
    }
}

async fn serve_one<Req, H, Fut>(
    stream: tokio::net::UnixStream,
    handler: H,
    events: Option<EventBus>,
) -> std::io::Result<()>
where
    Req: DeserializeOwned,
    H: Fn(Req, Progress) -> Fut,
    Fut: Future<Output = Result<serde_json::Value, String>> + Send + 'static,
{
    let (rd, mut wr) = stream.into_split();
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

async fn write_reply(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &Reply,
) -> std::io::Result<()> {
    let mut text = serde_json::to_string(reply).map_err(std::io::Error::other)?;
    text.push('\n');
    wr.write_all(text.as_bytes()).await
}

/// Answers a subscription: an acknowledgement, then every event until the client goes
/// away or falls so far behind that the bus drops it.
async fn stream_events(
    events: Option<EventBus>,
    mut wr: tokio::net::unix::OwnedWriteHalf,
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

/// Sends `req` to the daemon at `path` and waits for its final reply, calling
/// `on_progress` for each progress line. `timeout` bounds each read (None: wait forever).
pub fn call<Req: Serialize>(
    path: &Path,
    req: &Req,
    timeout: Option<Duration>,
    mut on_progress: impl FnMut(serde_json::Value),
) -> Result<serde_json::Value, ControlError> {
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    stream.set_read_timeout(timeout)?;
    let mut text = serde_json::to_string(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    text.push('\n');
    stream.write_all(text.as_bytes())?;
    let mut rd = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = (&mut rd).take(MAX_LINE as u64).read_line(&mut line)?;
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
    path: &Path,
    req: &Req,
) -> Result<Resp, ControlError> {
    let v = call(path, req, Some(DEFAULT_TIMEOUT), |_| {})?;
    serde_json::from_value(v).map_err(|e| ControlError::Protocol(e.to_string()))
}

/// Sends the typed request `req` to the daemon at `path` and returns its typed reply
/// (default read timeout).
pub fn request<R: Request>(path: &Path, req: R) -> Result<R::Reply, ControlError> {
    request_with_progress(path, req, Some(DEFAULT_TIMEOUT), |_: serde_json::Value| {})
}

/// [`request`] with progress lines of type `P` and a read timeout of choice (None: wait
/// forever). A progress line of another shape is skipped.
pub fn request_with_progress<R: Request, P: DeserializeOwned>(
    path: &Path,
    req: R,
    timeout: Option<Duration>,
    mut on_progress: impl FnMut(P),
) -> Result<R::Reply, ControlError> {
    let api: R::Api = req.into();
    let v = call(path, &api, timeout, |v| {
        if let Ok(p) = serde_json::from_value(v) {
            on_progress(p)
        }
    })?;
    serde_json::from_value(v).map_err(|e| ControlError::Protocol(e.to_string()))
}

/// A live event stream from one daemon (blocking reads).
pub struct EventStream {
    source: String,
    rd: BufReader<std::os::unix::net::UnixStream>,
}

impl EventStream {
    /// Subscribes to the events of the daemon at `path`. Returns once the daemon has
    /// acknowledged: every event it publishes from then on is in the stream.
    pub fn open(path: &Path) -> Result<EventStream, ControlError> {
        let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|source| {
            ControlError::Connect {
                path: path.to_path_buf(),
                source,
            }
        })?;
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        let mut text = serde_json::to_string(&Subscribe::default())
            .map_err(|e| ControlError::Protocol(e.to_string()))?;
        text.push('\n');
        stream.write_all(text.as_bytes())?;
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
    pub fn closer(&self) -> std::io::Result<std::os::unix::net::UnixStream> {
        self.rd.get_ref().try_clone()
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

fn read_reply(
    rd: &mut BufReader<std::os::unix::net::UnixStream>,
) -> Result<Option<Reply>, ControlError> {
    let mut line = String::new();
    let n = rd.take(MAX_LINE as u64).read_line(&mut line)?;
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
        let server = tokio::spawn(serve_events(
            listener,
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
