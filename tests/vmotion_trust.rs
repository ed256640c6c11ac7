//! vMotion security and faults with real `vfabric host` processes on loopback (no root):
//! an unauthenticated peer cannot push a VM (plaintext, or TLS with another fabric's
//! certificate), a fake target receives no memory, pre-authentication connections hold
//! no memory and no reservation, a drip-fed handshake is cut at the deadline, the three
//! encryption modes negotiate as documented, and a source host that dies mid-migration
//! is named with its phase and the VM's fate.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use vfabric::control;
use vfabric::guest::{DeviceState, Pattern, VmConfig, WorkloadConfig};
use vfabric::host::api::{self, MigrateOptions};
use vfabric::migration::proto::{self, Message};
use vfabric::migration::tls::{self, Encryption, Tls};
use vfabric::pki;

const BIN: &str = env!("CARGO_BIN_EXE_vfabric");

struct Fabric {
    dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for (name, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                let path = self.dir.path().join(format!("{name}.log"));
                let log = std::fs::read_to_string(path).unwrap_or_default();
                eprintln!("--- log of {name} ---\n{log}");
            }
        }
    }
}

impl Fabric {
    /// A fabric CA, a certificate per host, and the hosts: (name, extra arguments).
    fn start(hosts: &[(&str, &[&str])]) -> Fabric {
        let mut f = Fabric {
            dir: tempfile::tempdir().unwrap(),
            children: vec![],
        };
        f.ok(&["pki", "init"]);
        let mut issue = vec!["pki", "issue"];
        issue.extend(hosts.iter().map(|(n, _)| *n));
        f.ok(&issue);
        for (name, extra) in hosts {
            let log = std::fs::File::create(f.log(name)).unwrap();
            let child = Command::new(BIN)
                .args(["host", "--name", name, "--vmotion-addr", "127.0.0.1:0"])
                .args(["--capacity-mb", "4096"])
                .args(*extra)
                .arg("--datastore")
                .arg(f.datastore())
                .env("VFABRIC_RUN_DIR", f.run_dir())
                .env_remove("RUST_LOG")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            f.children.push((name.to_string(), child));
        }
        for (name, _) in hosts {
            let t = Instant::now();
            while !f.run_dir().join(format!("{name}.sock")).exists() {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "{name} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        f
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    fn datastore(&self) -> PathBuf {
        self.dir.path().join("datastore")
    }
    fn pki_dir(&self) -> PathBuf {
        self.run_dir().join("pki")
    }
    fn log(&self, host: &str) -> PathBuf {
        self.dir.path().join(format!("{host}.log"))
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("VFABRIC_RUN_DIR", self.run_dir())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "vfabric {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// A failing command's one error line.
    fn fail(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(!o.status.success(), "vfabric {args:?} should fail");
        let err = String::from_utf8(o.stderr).unwrap();
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("vfabric: error:"), "{err}");
        assert_eq!(err.matches("vfabric: error:").count(), 1, "{err}");
        last.to_string()
    }

    fn info(&self, host: &str) -> Value {
        serde_json::to_value(control::request(self.sock(host), api::Info {}).unwrap()).unwrap()
    }

    fn sock(&self, host: &str) -> PathBuf {
        self.run_dir().join(format!("{host}.sock"))
    }

    fn vmotion_addr(&self, host: &str) -> SocketAddr {
        self.info(host)["vmotion_addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn create(&self, vm: &str, host: &str, extra: &[&str]) {
        let mut args = vec!["vm", "create", vm, "--host", host, "--ip", "10.10.0.77"];
        args.extend(["--memory-mb", "32"]);
        args.extend(extra);
        self.ok(&args);
    }

    fn vm_host(&self, vm: &str) -> Option<(String, String)> {
        let list: Value = serde_json::from_str(&self.ok(&["vm", "list", "--json"])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vm)
            .map(|v| {
                (
                    v["host"].as_str().unwrap().into(),
                    v["state"].as_str().unwrap().into(),
                )
            })
    }
}

fn lock_file(ds: &Path, vm: &str) -> bool {
    ds.join(format!("{vm}.lock")).exists() || ds.join(format!("{vm}.vmdk")).exists()
}

fn evil_config(memory_mb: u64) -> VmConfig {
    VmConfig {
        name: "evil".into(),
        vcpus: 1,
        memory_mb,
        word_bits: 64,
        mac: "02:00:00:00:66:66".parse().unwrap(),
        ip: Ipv4Addr::new(10, 10, 0, 66),
        workload: WorkloadConfig {
            pattern: Pattern::Idle,
            dirty_rate: 0,
        },
    }
}

/// The whole push of a VM, as the attack sent it: Hello, an empty round, an empty
/// bitmap, the device state, Complete.
fn attack_bytes() -> Vec<u8> {
    let cfg = evil_config(16);
    let pages = cfg.page_count();
    let json = serde_json::to_vec(&cfg).unwrap();
    let state = serde_json::to_vec(&DeviceState::initial(&cfg)).unwrap();
    let words = vec![0u64; proto::bitmap_words(pages)];
    let mut out = Vec::new();
    for m in [
        Message::Hello { config_json: &json },
        Message::RoundEnd { round: 1 },
        Message::Bitmap {
            quiesce_t_us: 1,
            pages,
            converged: true,
            words: words.as_slice().into(),
        },
        Message::DeviceState { json: &state },
        Message::Complete { sha256: None },
    ] {
        proto::encode(&m, &mut out);
    }
    out
}

/// Sends `bytes` and reads whatever comes back until the peer closes (or 3 s pass).
fn push_and_drain(mut s: impl Read + Write, bytes: &[u8]) -> Vec<u8> {
    let _ = s.write_all(bytes);
    let _ = s.flush();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    got
}

/// Another fabric's CA and a certificate it issued under `name`.
fn foreign_credentials(dir: &Path, name: &str) -> pki::HostCredentials {
    pki::init(dir).unwrap();
    pki::issue(dir, name).unwrap();
    pki::load(dir, name).unwrap()
}

/// A TLS client that presents `creds` and believes any server: the attacker's.
fn attacker_tls(creds: &pki::HostCredentials) -> Arc<rustls::ClientConfig> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    #[derive(Debug)]
    struct Believer(Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for Believer {
        fn verify_server_cert(
            &self,
            _: &pki_types::CertificateDer<'_>,
            _: &[pki_types::CertificateDer<'_>],
            _: &pki_types::ServerName<'_>,
            _: &[u8],
            _: pki_types::UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Believer(provider)))
        .with_client_auth_cert(vec![creds.cert.clone()], creds.key.clone_key())
        .unwrap();
    Arc::new(cfg)
}

fn assert_no_evil(f: &Fabric, host: &str) {
    assert_eq!(
        f.vm_host("evil"),
        None,
        "an unauthenticated peer created a VM"
    );
    assert_eq!(f.info(host)["reserved_mb"], 0);
    assert!(!lock_file(&f.datastore(), "evil"), "the attack got a disk");
}

#[test]
fn an_unauthenticated_peer_cannot_push_a_vm() {
    let f = Fabric::start(&[("silo105", &[])]);
    let addr = f.vmotion_addr("silo105");

    // Plaintext, our own encoder: refused at the first byte.
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let answer = push_and_drain(&s, &attack_bytes());
    assert!(
        answer.is_empty(),
        "plaintext peer got an answer: {answer:?}"
    );
    assert_no_evil(&f, "silo105");

    // TLS with a certificate from another fabric's CA, named like a real host.
    let other = tempfile::tempdir().unwrap();
    let creds = foreign_credentials(other.path(), "silo104");
    let name = pki_types::ServerName::try_from("silo105").unwrap();
    let mut conn = rustls::ClientConnection::new(attacker_tls(&creds), name).unwrap();
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let answer = push_and_drain(&mut tls, &attack_bytes());
    assert!(answer.is_empty(), "foreign certificate got an answer");
    assert_no_evil(&f, "silo105");

    // The refusals cost no log line each (a summary comes every 10 s).
    let log = std::fs::read_to_string(f.log("silo105")).unwrap();
    assert!(log.lines().count() <= 2, "per-connection log lines:\n{log}");
}

/// A fake target: accepts one connection, speaks TLS with `tls` if given (any client
/// certificate of its own CA), and returns every application byte it received.
fn fake_target(tls: Option<Tls>) -> (SocketAddr, std::thread::JoinHandle<(bool, Vec<u8>)>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use tokio::io::AsyncReadExt;
            let (s, _) = l.accept().unwrap();
            s.set_nonblocking(true).unwrap();
            let s = tokio::net::TcpStream::from_std(s).unwrap();
            let mut stream: tls::Stream = match &tls {
                None => Box::new(s),
                Some(t) => match tls::accept(s, Encryption::Opportunistic, Some(t)).await {
                    Ok((s, _)) => s,
                    Err(_) => return (false, Vec::new()),
                },
            };
            let mut got = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
            (true, got)
        })
    });
    (addr, h)
}

fn migrate_to(f: &Fabric, vm: &str, target: &str, addr: SocketAddr) -> String {
    let req = api::Migrate {
        name: vm.into(),
        target: target.into(),
        target_addr: addr,
        options: MigrateOptions::default(),
    };
    let r = control::request_with_progress(
        f.sock("silo104"),
        req,
        Some(Duration::from_secs(30)),
        |_: Value| {},
    );
    match r {
        Ok(v) => panic!("migration to a fake target succeeded: {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_fake_target_receives_no_memory() {
    let f = Fabric::start(&[("silo104", &[]), ("silo105", &[])]);
    f.create(
        "vm1",
        "silo104",
        &["--workload", "sweep", "--dirty-rate", "1000"],
    );

    // 1. A plaintext listener: it gets a TLS hello and nothing of the protocol.
    let (addr, h) = fake_target(None);
    let err = migrate_to(&f, "vm1", "silo105", addr);
    let (_, got) = h.join().unwrap();
    assert!(err.contains("keeps running on silo104"), "{err}");
    assert!(
        !got.windows(4).any(|w| w == proto::MAGIC),
        "protocol bytes crossed"
    );
    assert!(got.len() < 4096, "{} bytes crossed", got.len());

    // 2. A host of this fabric, but not the one meant (silo999 posing as silo105).
    f.ok(&["pki", "issue", "silo999"]);
    let impostor = Tls::new(&pki::load(&f.pki_dir(), "silo999").unwrap()).unwrap();
    let (addr, h) = fake_target(Some(impostor));
    let err = migrate_to(&f, "vm1", "silo105", addr);
    let (authenticated, got) = h.join().unwrap();
    assert!(err.contains("did not authenticate as silo105"), "{err}");
    assert!(!authenticated && got.is_empty());

    // 3. Another fabric's certificate named silo105.
    let other = tempfile::tempdir().unwrap();
    let foreign = Tls::new(&foreign_credentials(other.path(), "silo105")).unwrap();
    let (addr, h) = fake_target(Some(foreign));
    let err = migrate_to(&f, "vm1", "silo105", addr);
    let (authenticated, got) = h.join().unwrap();
    assert!(err.contains("did not authenticate"), "{err}");
    assert!(!authenticated && got.is_empty());

    // The VM never left, and still moves to the real silo105, encrypted.
    assert_eq!(f.vm_host("vm1"), Some(("silo104".into(), "running".into())));
    let s: Value =
        serde_json::from_str(&f.ok(&["migrate", "vm1", "--to", "silo105", "--json"])).unwrap();
    let transport = s["transport"].as_str().unwrap();
    assert!(
        transport.contains("TLS 1.3") && transport.contains("silo105"),
        "{transport}"
    );
    assert_eq!(s["memory_sha256_source"], s["memory_sha256_target"]);
}

/// Opens `n` connections that each send a legal-looking 2 MiB bitmap before any Hello.
fn flood(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let pages = 2 << 20 << 3; // a 2 MiB bitmap
    let mut msg = Vec::new();
    let words = vec![0u64; proto::bitmap_words(pages)];
    proto::encode(
        &Message::Bitmap {
            quiesce_t_us: 0,
            pages,
            converged: false,
            words: words.as_slice().into(),
        },
        &mut msg,
    );
    let msg = Arc::new(msg);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let msg = msg.clone();
            std::thread::spawn(move || {
                let mut v = Vec::new();
                for _ in 0..n / 8 {
                    let Ok(mut s) = TcpStream::connect(addr) else {
                        continue;
                    };
                    s.set_write_timeout(Some(Duration::from_millis(500)))
                        .unwrap();
                    let _ = s.write_all(&msg);
                    v.push(s);
                }
                v
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect()
}

#[test]
fn pre_auth_connections_hold_no_memory_and_no_reservation() {
    for mode in ["required", "opportunistic"] {
        let f = Fabric::start(&[("silo105", &["--vmotion-encryption", mode])]);
        let addr = f.vmotion_addr("silo105");
        let rss_before = f.info("silo105")["rss_kib"].as_u64().unwrap();
        let log_before = std::fs::metadata(f.log("silo105")).unwrap().len();

        // A Hello for a VM that fills the host, kept alive a byte at a time.
        let mut hello = Vec::new();
        let json = serde_json::to_vec(&evil_config(3500)).unwrap();
        proto::encode(&Message::Hello { config_json: &json }, &mut hello);
        // Whole in `required` (refused at its first byte); in `opportunistic` plaintext
        // is admitted by design, so only its last byte is held back.
        let mut held = TcpStream::connect(addr).unwrap();
        let keep = if mode == "required" { 0 } else { 1 };
        held.write_all(&hello[..hello.len() - keep]).unwrap();

        let conns = flood(addr, 200);
        std::thread::sleep(Duration::from_millis(500));
        let info = f.info("silo105");
        assert_eq!(
            info["reserved_mb"], 0,
            "{mode}: reserved before authentication"
        );
        let rss_after = info["rss_kib"].as_u64().unwrap();
        assert!(
            rss_after < rss_before + 32 * 1024,
            "{mode}: RSS grew from {rss_before} to {rss_after} KiB under 200 connections"
        );
        let _ = held.write_all(b"x");
        drop(conns);
        let log_after = std::fs::metadata(f.log("silo105")).unwrap().len();
        assert!(
            log_after < log_before + 1024,
            "{mode}: the log grew by {} bytes for refused connections",
            log_after - log_before
        );
        // A legitimate VM still fits.
        f.create("vm1", "silo105", &[]);
    }
}

#[test]
fn a_drip_fed_handshake_is_cut_at_the_deadline() {
    // The start of a legal first record, then zeros a byte at a time: a TLS record of
    // 512 bytes, or a Hello of 1000 bytes.
    let mut hello = Vec::new();
    proto::encode(
        &Message::Hello {
            config_json: &[0; 1000],
        },
        &mut hello,
    );
    let starts: [(&str, Vec<u8>); 2] = [
        ("required", vec![0x16, 0x03, 0x01, 0x02, 0x00]),
        ("opportunistic", hello[..proto::HEADER_LEN].to_vec()),
    ];
    for (mode, start) in starts {
        let f = Fabric::start(&[(
            "silo105",
            &[
                "--vmotion-encryption",
                mode,
                "--vmotion-handshake-ms",
                "1000",
                "--io-timeout-ms",
                "1000",
            ],
        )]);
        let mut s = TcpStream::connect(f.vmotion_addr("silo105")).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let t = Instant::now();
        let mut drip = start;
        drip.extend(std::iter::repeat_n(0u8, 100));
        let mut cut = None;
        for b in drip {
            if s.write_all(&[b]).is_err() {
                cut = Some(t.elapsed());
                break;
            }
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Ok(0) => {
                    cut = Some(t.elapsed());
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => {
                    cut = Some(t.elapsed());
                    break;
                }
            }
            if t.elapsed() > Duration::from_secs(8) {
                break;
            }
        }
        let cut = cut.unwrap_or_else(|| panic!("{mode}: a 10 byte/s drip stayed open 8 s"));
        assert!(
            cut >= Duration::from_millis(900) && cut < Duration::from_secs(4),
            "{mode}: cut after {cut:?}, deadline 1 s"
        );
    }
}

#[test]
fn the_three_modes_negotiate_as_documented() {
    let f = Fabric::start(&[
        ("a", &["--vmotion-encryption", "opportunistic"]),
        ("b", &["--vmotion-encryption", "disabled"]),
    ]);
    f.create("v", "a", &[]);
    // Opportunistic to disabled: the TLS hello is closed on, plaintext follows.
    let s: Value = serde_json::from_str(&f.ok(&["migrate", "v", "--to", "b", "--json"])).unwrap();
    assert!(
        s["transport"].as_str().unwrap().starts_with("plaintext"),
        "{s}"
    );
    // Back, disabled to opportunistic: plaintext accepted.
    let s: Value = serde_json::from_str(&f.ok(&["migrate", "v", "--to", "a", "--json"])).unwrap();
    assert!(
        s["transport"].as_str().unwrap().starts_with("plaintext"),
        "{s}"
    );
    // Required for this migration: the disabled host refuses TLS; the VM stays.
    let err = f.fail(&["migrate", "v", "--to", "b", "--encryption", "required"]);
    assert!(err.contains("keeps running on a"), "{err}");
    assert_eq!(f.vm_host("v"), Some(("a".into(), "running".into())));
    assert_eq!(f.info("b")["reserved_mb"], 0);
}

#[test]
fn a_required_host_without_a_certificate_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(["host", "--name", "lonely", "--vmotion-addr", "127.0.0.1:0"])
        .arg("--datastore")
        .arg(dir.path().join("ds"))
        .env("VFABRIC_RUN_DIR", dir.path().join("run"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("vfabric pki init"), "{err}");
}

#[test]
fn a_dead_source_is_named_with_its_phase_and_the_vms_fate() {
    let mut f = Fabric::start(&[("silo104", &[]), ("silo105", &[])]);
    f.create(
        "vm1",
        "silo104",
        &["--workload", "uniform", "--dirty-rate", "20000"],
    );
    // A slow link keeps pre-copy going for seconds.
    let cli = Command::new(BIN)
        .args([
            "migrate",
            "vm1",
            "--to",
            "silo105",
            "--bandwidth-mbps",
            "40",
        ])
        .env("VFABRIC_RUN_DIR", f.run_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The target reserves memory once the pre-check passed: pre-copy has begun.
    let t = Instant::now();
    while f.info("silo105")["reserved_mb"] == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "pre-copy never began"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(800));
    let (_, source) = &mut f.children[0];
    source.kill().unwrap();
    source.wait().unwrap();
    let o = cli.wait_with_output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8(o.stderr).unwrap();
    let line = err.lines().last().unwrap();
    assert!(line.starts_with("vfabric: error:"), "{err}");
    assert!(!err.contains("without a reply"), "{err}");
    for word in ["host silo104", "pre-copy", "lost with silo104"] {
        assert!(line.contains(word), "missing {word:?}: {line}");
    }
    // The target kept nothing.
    assert_eq!(f.info("silo105")["reserved_mb"], 0);
    assert!(f.info("silo105")["vms"].as_array().unwrap().is_empty());
}
