//! `vfabric udp`: a one-shot client of the guest's UDP request service, for shells in
//! the client namespace (`ip netns exec vf-client vfabric udp 10.10.0.100 incr`).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use clap::Args;
use vfabric::guest::nic::{self, RequestError, UDP_SERVICE_PORT};

use super::CliError;

#[derive(Debug, Args)]
pub struct UdpArgs {
    /// The VM's address, with an optional port (default 7777): 10.10.0.100 or 10.10.0.100:7777
    pub addr: String,
    /// The request words, joined by spaces: incr | get | get KEY | put KEY VALUE
    /// (checked before anything is sent)
    #[arg(required = true, num_args = 1..)]
    pub request: Vec<String>,
    /// How long to wait for the reply
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub timeout_ms: u64,
}

#[derive(Debug, thiserror::Error)]
enum UdpError {
    #[error("cannot resolve {0:?} (expected ADDR or ADDR:PORT)")]
    BadAddress(String),
    /// Refused here, before sending: the service would refuse it too.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The service answered with an error.
    #[error("{addr} refused the request: {reason}")]
    Refused { addr: SocketAddr, reason: String },
    #[error("{op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no reply from {addr} within {ms} ms")]
    Timeout { addr: SocketAddr, ms: u64 },
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> UdpError {
    move |source| UdpError::Io { op, source }
}

fn target(addr: &str) -> Result<SocketAddr, UdpError> {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = addr.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, UDP_SERVICE_PORT));
    }
    let with_port = if addr.contains(':') {
        addr.to_socket_addrs()
    } else {
        (addr, UDP_SERVICE_PORT).to_socket_addrs()
    };
    with_port
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| UdpError::BadAddress(addr.to_string()))
}

pub fn run(args: UdpArgs) -> Result<(), CliError> {
    let addr = target(&args.addr)?;
    let request = args.request.join(" ");
    nic::parse_request(request.as_bytes()).map_err(UdpError::from)?;
    let local = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = UdpSocket::bind(local).map_err(io("bind a UDP socket"))?;
    sock.send_to(request.as_bytes(), addr)
        .map_err(io("send the request"))?;
    let deadline = Instant::now() + Duration::from_millis(args.timeout_ms);
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(UdpError::Timeout {
                addr,
                ms: args.timeout_ms,
            }
            .into());
        }
        sock.set_read_timeout(Some(left))
            .map_err(io("set the reply timeout"))?;
        match sock.recv_from(&mut buf) {
            // Only the service's answer counts; stray datagrams to our port are skipped.
            Ok((n, from)) if from == addr => {
                let reply = String::from_utf8_lossy(&buf[..n]);
                if let Some(reason) = reply.strip_prefix("error: ") {
                    return Err(UdpError::Refused {
                        addr,
                        reason: reason.to_string(),
                    }
                    .into());
                }
                println!("{reply}");
                return Ok(());
            }
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(io("receive the reply")(e).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_default_to_the_service_port() {
        assert_eq!(
            target("10.10.0.100").unwrap(),
            "10.10.0.100:7777".parse().unwrap()
        );
        assert_eq!(
            target("10.10.0.100:9").unwrap(),
            "10.10.0.100:9".parse().unwrap()
        );
        assert!(target("not an address").is_err());
    }

    #[test]
    fn asks_and_prints_or_times_out() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut b = [0u8; 64];
            let (n, from) = server.recv_from(&mut b).unwrap();
            assert_eq!(&b[..n], b"put k v w");
            server.send_to(b"ok", from).unwrap();
        });
        let args = UdpArgs {
            addr: addr.to_string(),
            request: vec!["put".into(), "k".into(), "v w".into()],
            timeout_ms: 2000,
        };
        run(args).unwrap();
        t.join().unwrap();

        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let args = UdpArgs {
            addr: silent.local_addr().unwrap().to_string(),
            request: vec!["get".into()],
            timeout_ms: 50,
        };
        let e = run(args).unwrap_err();
        assert!(e.to_string().starts_with("no reply from 127.0.0.1:"), "{e}");
        assert!(e.to_string().ends_with("within 50 ms"), "{e}");
    }

    #[test]
    fn a_request_the_service_would_refuse_is_not_sent() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_nonblocking(true).unwrap();
        for words in [vec!["frobnicate"], vec!["put", "k"], vec!["get", "a", "b"]] {
            let args = UdpArgs {
                addr: server.local_addr().unwrap().to_string(),
                request: words.iter().map(|w| w.to_string()).collect(),
                timeout_ms: 50,
            };
            let e = run(args).unwrap_err().to_string();
            assert!(
                e.starts_with("unknown request") || e.starts_with("usage:"),
                "{words:?}: {e}"
            );
        }
        let mut b = [0u8; 64];
        assert!(
            server.recv_from(&mut b).is_err(),
            "a refused request was sent"
        );
    }

    #[test]
    fn an_error_reply_is_an_error() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut b = [0u8; 64];
            let (_, from) = server.recv_from(&mut b).unwrap();
            server
                .send_to(b"error: store full (64 keys)", from)
                .unwrap();
        });
        let args = UdpArgs {
            addr: addr.to_string(),
            request: vec!["put".into(), "k".into(), "v".into()],
            timeout_ms: 2000,
        };
        let e = run(args).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{addr} refused the request: store full (64 keys)")
        );
        t.join().unwrap();
    }
}
