//! Control plane: a Unix socket per daemon, one JSON request line in, JSON reply lines out.
//!
//! The socket lives at `<runtime dir>/<name>.sock` (runtime dir: `$VFABRIC_RUN_DIR`, else
//! `/run/vfabric`), mode 0600 in a 0700 directory. A request is one line of JSON; the
//! server answers with zero or more [`Reply::Progress`] lines and then exactly one
//! [`Reply::Ok`] or [`Reply::Err`]. Unix sockets ignore network namespaces, so the CLI
//! reaches daemons in any namespace without `ip netns exec`.

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

/// Longest request or reply line accepted, in bytes.
pub const MAX_LINE: usize = 1 << 20;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(bind_err)?;
        }
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
pub async fn serve<Req, H, Fut, S>(listener: UnixListener, handler: H, shutdown: S)
where
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
                tokio::spawn(async move {
                    if let Err(e) = serve_one::<Req, H, Fut>(stream, handler).await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
        }
    }
}

async fn serve_one<Req, H, Fut>(stream: tokio::net::UnixStream, handler: H) -> std::io::Result<()>
where
    Req: DeserializeOwned,
    H: Fn(Req, Progress) -> Fut,
    Fut: Future<Output = Result<serde_json::Value, String>> + Send + 'static,
{
    let (rd, mut wr) = stream.into_split();
    let mut rd = tokio::io::BufReader::new(rd).take(MAX_LINE as u64);
    let mut line = String::new();
    // A client that connects and says nothing does not keep its descriptor forever.
    tokio::time::timeout(REQUEST_TIMEOUT, rd.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
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
            Reply::Ok(v) => return Ok(v),
            Reply::Err(e) => return Err(ControlError::Remote(e)),
        }
    }
}

/// Convenience: a call with a 10 s read timeout and no progress.
pub fn call_simple<Req: Serialize, Resp: DeserializeOwned>(
    path: &Path,
    req: &Req,
) -> Result<Resp, ControlError> {
    let v = call(path, req, Some(Duration::from_secs(10)), |_| {})?;
    serde_json::from_value(v).map_err(|e| ControlError::Protocol(e.to_string()))
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

    #[test]
    fn missing_daemon_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            call_simple::<_, serde_json::Value>(&dir.path().join("none.sock"), &1u8).unwrap_err();
        assert!(err.to_string().contains("is the daemon running?"), "{err}");
    }
}
