//! Switch daemon life cycle (adapter): create and place the TAP ports, start the data
//! path, then serve the control socket until SIGINT/SIGTERM and tear everything down.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use super::api::{self, SwitchRequest};
use super::{Fabric, FabricError, SwitchPort};
use crate::control::{self, ControlError, Request};
use crate::events::{Event, EventBus};
use crate::names::{self, NameError};
use crate::port::attach::{AttachError, AttachPort};
use crate::port::qemu::{
    self, DgramPort, DgramSpec, DgramSpecError, QemuPortError, SocketPathError, StreamPort,
};
use crate::port::tap::{Tap, TapError};
use crate::port::vxlan::{VxlanError, VxlanPort, VxlanSpec, VxlanSpecError};
use crate::port::Port;
use crate::switch::{FdbConfig, PortId};
use crate::wire::vnet::VNET_HDR_LEN;

/// Most ports one switch takes.
pub const MAX_PORTS: usize = 256;

/// `NAME=NETNS:IFNAME` (a TAP), `NAME=attach:NETNS:IFNAME` (an existing interface),
/// `NAME=vxlan:KEY=VALUE,…` (a VXLAN tunnel), `NAME=qemu-stream:PATH` or
/// `NAME=qemu-dgram:local=PATH,remote=PATH` (a QEMU guest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub name: String,
    pub kind: PortKind,
}

/// What a port is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortKind {
    /// A TAP whose interface is moved into NETNS and renamed IFNAME there (empty NETNS:
    /// the interface stays in the switch's namespace).
    Tap { netns: String, ifname: String },
    /// An existing interface IFNAME in NETNS (empty: the switch's namespace), used
    /// through a packet socket: a libvirt/QEMU TAP or a veth end.
    Attach { netns: String, ifname: String },
    /// A VXLAN tunnel port over a UDP socket.
    Vxlan(VxlanSpec),
    /// A Unix stream socket a QEMU `-netdev stream` connects to.
    QemuStream { path: std::path::PathBuf },
    /// A Unix datagram socket paired with a QEMU `-netdev dgram`.
    QemuDgram(DgramSpec),
}

impl PortKind {
    /// The interface a TAP or attach port stands for: (namespace, name).
    fn interface(&self) -> Option<(&str, &str)> {
        match self {
            PortKind::Tap { netns, ifname } | PortKind::Attach { netns, ifname } => {
                Some((netns, ifname))
            }
            PortKind::Vxlan(_) | PortKind::QemuStream { .. } | PortKind::QemuDgram(_) => None,
        }
    }
}

impl std::fmt::Display for PortSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            PortKind::Tap { netns, ifname } => write!(f, "{}={netns}:{ifname}", self.name),
            PortKind::Attach { netns, ifname } => {
                write!(f, "{}=attach:{netns}:{ifname}", self.name)
            }
            PortKind::Vxlan(v) => write!(f, "{}={v}", self.name),
            PortKind::QemuStream { path } => {
                write!(f, "{}=qemu-stream:{}", self.name, path.display())
            }
            PortKind::QemuDgram(d) => write!(
                f,
                "{}=qemu-dgram:local={},remote={}",
                self.name,
                d.local.display(),
                d.remote.display()
            ),
        }
    }
}

/// A port spec that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortSpecError {
    #[error(
        "bad port spec {spec:?}: {why} (expected NAME=NETNS:IFNAME, e.g. client=vf-client:eth0)"
    )]
    Syntax { spec: String, why: &'static str },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Vxlan(#[from] VxlanSpecError),
    #[error(transparent)]
    QemuPath(#[from] SocketPathError),
    #[error(transparent)]
    QemuDgram(#[from] DgramSpecError),
}

/// A kernel name (namespace, interface): not ours to restrict to the name rule, but it
/// becomes a path (/run/netns/NAME), so no separator and no `.`/`..`.
fn valid_token(s: &str) -> bool {
    s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl FromStr for PortSpec {
    type Err = PortSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| PortSpecError::Syntax {
            spec: s.chars().take(80).collect(),
            why,
        };
        let (name, rest) = s.split_once('=').ok_or_else(|| err("missing '='"))?;
        // An interface name has no '=': `vxlan:` followed by KEY=VALUE is a tunnel, and
        // `vxlan:eth0` is still the TAP eth0 in a namespace called vxlan.
        if let Some(v) = rest.strip_prefix("vxlan:").filter(|v| v.contains('=')) {
            names::validate("port", name)?;
            return Ok(PortSpec {
                name: name.to_string(),
                kind: PortKind::Vxlan(v.parse()?),
            });
        }
        if let Some(path) = rest.strip_prefix("qemu-stream:") {
            names::validate("port", name)?;
            return Ok(PortSpec {
                name: name.to_string(),
                kind: PortKind::QemuStream {
                    path: qemu::socket_path(path)?,
                },
            });
        }
        if let Some(d) = rest.strip_prefix("qemu-dgram:").filter(|d| d.contains('=')) {
            names::validate("port", name)?;
            return Ok(PortSpec {
                name: name.to_string(),
                kind: PortKind::QemuDgram(d.parse()?),
            });
        }
        // `attach:NETNS:IFNAME`; `attach:eth0` alone is the TAP eth0 in a namespace
        // called attach.
        let (attach, rest) = match rest.strip_prefix("attach:").filter(|r| r.contains(':')) {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let (netns, ifname) = rest.split_once(':').ok_or_else(|| err("missing ':'"))?;
        names::validate("port", name)?;
        if !valid_token(netns) {
            return Err(err("namespace name has bad characters"));
        }
        if ifname.is_empty() || ifname.len() > 15 || !valid_token(ifname) {
            return Err(err(
                "interface name must be 1 to 15 letters, digits, '-', '_', '.'",
            ));
        }
        let (netns, ifname) = (netns.to_string(), ifname.to_string());
        Ok(PortSpec {
            name: name.to_string(),
            kind: if attach {
                PortKind::Attach { netns, ifname }
            } else {
                PortKind::Tap { netns, ifname }
            },
        })
    }
}

/// Everything `vfabric switch` was asked to do.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Names the control socket: `<run dir>/<name>.sock`.
    pub name: String,
    pub ports: Vec<PortSpec>,
    /// Name of a mirror TAP left in the switch's namespace.
    pub mirror: Option<String>,
    pub fdb: FdbConfig,
    /// Exchange GSO frames and partial checksums with the kernel.
    pub offload: bool,
    /// One data-path thread for all ports, or one per port.
    pub threading: super::Threading,
    /// SCHED_FIFO priority of the data-path threads (None: normal scheduling).
    pub rt_priority: Option<u8>,
    /// CPU the data-path threads are pinned to.
    pub cpu: Option<usize>,
    /// Frames forwarded between two polls (0: the default).
    pub batch: usize,
}

/// Errors of the switch daemon.
#[derive(Debug, thiserror::Error)]
pub enum SwitchdError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("no ports given (use --port NAME=NETNS:IFNAME)")]
    NoPorts,
    #[error("too many ports (at most {MAX_PORTS})")]
    TooManyPorts,
    #[error("port {0:?} given twice")]
    DuplicatePort(String),
    #[error("interface {ifname:?} given twice in namespace {netns:?}")]
    DuplicateIfname { netns: String, ifname: String },
    #[error("port {port}")]
    Tap {
        port: String,
        #[source]
        source: TapError,
    },
    #[error("port {port}")]
    Attach {
        port: String,
        #[source]
        source: AttachError,
    },
    #[error("port {port}")]
    Vxlan {
        port: String,
        #[source]
        source: VxlanError,
    },
    #[error("port {port}")]
    Qemu {
        port: String,
        #[source]
        source: QemuPortError,
    },
    #[error("a real-time priority is 1 to 99")]
    BadPriority,
    #[error("cannot start the data path")]
    Fabric(#[from] FabricError),
    #[error("control socket")]
    Control(#[from] ControlError),
    #[error("cannot start the control runtime")]
    Runtime(#[source] std::io::Error),
}

impl DaemonConfig {
    fn validate(&self) -> Result<(), SwitchdError> {
        names::validate("switch", &self.name)?;
        if self.ports.is_empty() {
            return Err(SwitchdError::NoPorts);
        }
        if self.ports.len() > MAX_PORTS {
            return Err(SwitchdError::TooManyPorts);
        }
        if self.rt_priority.is_some_and(|p| !(1..=99).contains(&p)) {
            return Err(SwitchdError::BadPriority);
        }
        for (i, p) in self.ports.iter().enumerate() {
            for q in &self.ports[..i] {
                if q.name == p.name {
                    return Err(SwitchdError::DuplicatePort(p.name.clone()));
                }
                if let (Some((netns, ifname)), Some(other)) =
                    (p.kind.interface(), q.kind.interface())
                {
                    if other == (netns, ifname) {
                        return Err(SwitchdError::DuplicateIfname {
                            netns: netns.to_string(),
                            ifname: ifname.to_string(),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

fn create_tap(netns: &str, ifname: &str, offload: bool) -> Result<Tap, TapError> {
    if !netns.is_empty() && !std::path::Path::new("/run/netns").join(netns).exists() {
        return Err(TapError::NoNetns(netns.to_string()));
    }
    let mut tap = Tap::create("", offload)?;
    if netns.is_empty() {
        tap.rename(ifname)?;
    } else {
        tap.move_to_netns(netns, ifname)?;
    }
    Ok(tap)
}

/// Creates the port `spec` names; returns it with the namespace its interface or
/// socket lives in.
fn create_port(
    spec: &PortSpec,
    offload: bool,
) -> Result<(Box<dyn Port>, Option<String>), SwitchdError> {
    match &spec.kind {
        PortKind::Tap { netns, ifname } => {
            let tap = create_tap(netns, ifname, offload).map_err(|source| SwitchdError::Tap {
                port: spec.name.clone(),
                source,
            })?;
            let ns = tap.netns().map(str::to_string);
            Ok((Box::new(tap), ns))
        }
        PortKind::Attach { netns, ifname } => {
            let port = AttachPort::open(netns, ifname).map_err(|source| SwitchdError::Attach {
                port: spec.name.clone(),
                source,
            })?;
            Ok((Box::new(port), (!netns.is_empty()).then(|| netns.clone())))
        }
        PortKind::Vxlan(v) => {
            let port = VxlanPort::open(v, VNET_HDR_LEN).map_err(|source| SwitchdError::Vxlan {
                port: spec.name.clone(),
                source,
            })?;
            tracing::info!(port = %spec.name, spec = %port.spec(), "vxlan port ready");
            Ok((Box::new(port), v.netns.clone()))
        }
        PortKind::QemuStream { path } => {
            let port =
                StreamPort::listen(path, VNET_HDR_LEN, super::MAX_FRAME).map_err(|source| {
                    SwitchdError::Qemu {
                        port: spec.name.clone(),
                        source,
                    }
                })?;
            tracing::info!(port = %spec.name, path = %path.display(), "qemu stream port listening");
            Ok((Box::new(port), None))
        }
        PortKind::QemuDgram(d) => {
            let port = DgramPort::bind(d, VNET_HDR_LEN).map_err(|source| SwitchdError::Qemu {
                port: spec.name.clone(),
                source,
            })?;
            tracing::info!(port = %spec.name, local = %d.local.display(),
                remote = %d.remote.display(), "qemu dgram port ready");
            Ok((Box::new(port), None))
        }
    }
}

fn create_mirror(ifname: &str, offload: bool) -> Result<Tap, TapError> {
    let tap = Tap::create(ifname, offload)?;
    // The mirror only listens: keep the kernel from sending IPv6 router and neighbour
    // solicitations out of it. Best effort (IPv6 may be off altogether).
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.ifname()),
        "1",
    );
    tap.set_up()?;
    Ok(tap)
}

/// Runs the switch until SIGINT or SIGTERM. The control socket is bound only once every
/// port is in place, so scripts wait for it; it is removed on the way out, and the TAP
/// devices vanish as their fds close.
pub fn run(cfg: DaemonConfig) -> Result<(), SwitchdError> {
    cfg.validate()?;
    let events = EventBus::new(&cfg.name);
    let mut ports = Vec::with_capacity(cfg.ports.len());
    for (i, spec) in cfg.ports.iter().enumerate() {
        let (port, netns) = create_port(spec, cfg.offload)?;
        tracing::debug!(port = %spec.name, netns = ?netns, offload = cfg.offload, "port created");
        events.emit_now(Event::PortUp {
            port: spec.name.clone(),
            ifname: port.ifname().to_string(),
        });
        ports.push(SwitchPort::new(PortId(i as u16), &spec.name, netns, port));
    }
    let mirror = match &cfg.mirror {
        Some(name) => {
            let tap = create_mirror(name, cfg.offload).map_err(|source| SwitchdError::Tap {
                port: "mirror".into(),
                source,
            })?;
            tracing::info!(ifname = %tap.ifname(), "mirror ready");
            Some(SwitchPort::new(
                PortId(u16::MAX),
                "mirror",
                None,
                Box::new(tap),
            ))
        }
        None => None,
    };
    let opts = super::DataPathOptions {
        threading: cfg.threading,
        rt_priority: cfg.rt_priority,
        cpu: cfg.cpu,
        batch: cfg.batch,
    };
    let fabric = Arc::new(Fabric::start_opts(ports, mirror, cfg.fdb, opts, events)?);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(SwitchdError::Runtime)?;
    let path = control::socket_path(&cfg.name);
    let result = rt.block_on(serve(fabric.clone(), &cfg, &path));
    fabric.stop();
    tracing::info!(t_us = crate::clock::unix_micros(), "switch stopped");
    result
}

async fn serve(
    fabric: Arc<Fabric>,
    cfg: &DaemonConfig,
    path: &std::path::Path,
) -> Result<(), SwitchdError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(SwitchdError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(SwitchdError::Runtime)?;
    let listener = control::bind(path)?;
    tracing::info!(
        name = %cfg.name,
        socket = %path.display(),
        ports = cfg.ports.len(),
        t_us = crate::clock::unix_micros(),
        "switch ready"
    );

    let sweeper = {
        let fabric = fabric.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                fabric.sweep();
                fabric.refresh_links();
            }
        })
    };
    let events = fabric.events().clone();
    let goodbye = events.clone();
    let shutdown_fabric = fabric.clone();
    let offload = cfg.offload;
    let handler = move |req: SwitchRequest, _progress: control::Progress| {
        let fabric = fabric.clone();
        async move {
            type Never = std::convert::Infallible;
            match req {
                SwitchRequest::PortAdd(a) => {
                    // Creating a TAP runs `ip`, attaching enters a namespace: off the
                    // runtime's thread.
                    let r =
                        tokio::task::spawn_blocking(move || add_port(&fabric, &a.spec, offload))
                            .await
                            .unwrap_or_else(|e| Err(api::PortError::Failed(e.to_string())));
                    api::PortAdd::reply(r)
                }
                SwitchRequest::PortDel(d) => api::PortDel::reply(del_port(&fabric, &d.name)),
                SwitchRequest::FdbShow(_) => api::FdbShow::reply(Ok::<_, Never>(fabric.fdb())),
                SwitchRequest::FdbFlush(_) => api::FdbFlush::reply(Ok::<_, Never>(api::Flushed {
                    flushed: fabric.flush(),
                })),
                SwitchRequest::Ports(_) => api::Ports::reply(Ok::<_, Never>(fabric.stats())),
            }
        }
    };
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        for port in shutdown_fabric.port_names() {
            goodbye.emit_now(Event::PortDown { port });
        }
    };
    control::serve_with(listener, None, handler, Some(events), shutdown).await;
    sweeper.abort();
    // Let subscribers take the last events before the runtime goes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Only the socket we bound is ours to remove (a refused bind leaves another
    // daemon's socket alone).
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// `vfabric port add`: creates the port `spec` names and puts it on the running switch.
fn add_port(fabric: &Fabric, spec: &str, offload: bool) -> Result<api::PortAdded, api::PortError> {
    let spec: PortSpec = spec
        .parse()
        .map_err(|e: PortSpecError| api::PortError::Spec(e.to_string()))?;
    let stats = fabric.stats();
    if stats.len() > MAX_PORTS {
        return Err(api::PortError::Failed(
            SwitchdError::TooManyPorts.to_string(),
        ));
    }
    if stats.iter().any(|p| p.port == spec.name) || spec.name == "mirror" {
        return Err(api::PortError::Exists(spec.name));
    }
    if let Some((netns, ifname)) = spec.kind.interface() {
        if stats.iter().any(|p| {
            p.ifname == ifname && p.netns == netns && matches!(p.kind.as_str(), "tap" | "attach")
        }) {
            return Err(api::PortError::Failed(
                SwitchdError::DuplicateIfname {
                    netns: netns.to_string(),
                    ifname: ifname.to_string(),
                }
                .to_string(),
            ));
        }
    }
    let (port, netns) = create_port(&spec, offload)
        .map_err(|e| api::PortError::Failed(crate::errors::chain(&e)))?;
    let ifname = port.ifname().to_string();
    let kind = port.kind().to_string();
    let id = fabric
        .add_port(&spec.name, netns, port)
        .map_err(|e| match e {
            FabricError::DuplicatePort(n) => api::PortError::Exists(n),
            e => api::PortError::Failed(crate::errors::chain(&e)),
        })?;
    tracing::info!(port = %spec.name, %ifname, %kind, id = id.0, t_us = crate::clock::unix_micros(), "port added");
    fabric.events().emit_now(Event::PortUp {
        port: spec.name.clone(),
        ifname: ifname.clone(),
    });
    Ok(api::PortAdded {
        port: spec.name,
        id,
        ifname,
        kind,
    })
}

/// `vfabric port del`: takes the port off the running switch and flushes its entries.
fn del_port(fabric: &Fabric, name: &str) -> Result<api::PortDeleted, api::PortError> {
    let r = fabric.remove_port(name).map_err(|e| match e {
        FabricError::NoSuchPort(n) => api::PortError::NoSuchPort(n),
        e => api::PortError::Failed(crate::errors::chain(&e)),
    })?;
    fabric.events().emit_now(Event::PortDeleted {
        port: name.to_string(),
        ifname: r.ifname.clone(),
        fdb_entries_removed: r.fdb_entries_removed,
    });
    Ok(api::PortDeleted {
        port: name.to_string(),
        fdb_entries_removed: r.fdb_entries_removed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_kind_prints_back_as_it_parses() {
        for spec in [
            "client=vf-client:eth0",
            "vm2=attach::vnet0",
            "web=attach:vf-web:veth1",
            "vm1=qemu-stream:/run/x/vm1.sock",
            "vm3=qemu-dgram:local=/run/x/sw.sock,remote=/run/x/vm.sock",
        ] {
            let p: PortSpec = spec.parse().unwrap();
            assert_eq!(p.to_string(), spec);
            assert_eq!(p.to_string().parse::<PortSpec>().unwrap(), p);
        }
        let p: PortSpec = "vm2=attach::vnet0".parse().unwrap();
        assert_eq!(p.kind.interface(), Some(("", "vnet0")));
        let p: PortSpec = "vm1=qemu-stream:/run/x/vm1.sock".parse().unwrap();
        assert_eq!(p.kind.interface(), None);
    }

    #[test]
    fn port_specs_parse_or_say_why_not() {
        let p: PortSpec = "client=vf-client:eth0".parse().unwrap();
        assert_eq!(
            p,
            PortSpec {
                name: "client".into(),
                kind: PortKind::Tap {
                    netns: "vf-client".into(),
                    ifname: "eth0".into()
                }
            }
        );
        let p: PortSpec = "up=:uplink0".parse().unwrap();
        assert!(matches!(p.kind, PortKind::Tap { netns, .. } if netns.is_empty()));
        let p: PortSpec = "vm=attach:vf-a:vnet0".parse().unwrap();
        assert_eq!(
            p.kind,
            PortKind::Attach {
                netns: "vf-a".into(),
                ifname: "vnet0".into()
            }
        );
        assert_eq!(p.to_string(), "vm=attach:vf-a:vnet0");
        let p: PortSpec = "vm=attach::veth1".parse().unwrap();
        assert!(matches!(p.kind, PortKind::Attach { netns, .. } if netns.is_empty()));
        // A namespace may be called attach: with one ':' it is a TAP.
        let p: PortSpec = "t=attach:eth0".parse().unwrap();
        assert!(matches!(p.kind, PortKind::Tap { netns, .. } if netns == "attach"));
        for bad in ["vm=attach:ns:", "vm=attach:n/s:eth0", "vm=attach:ns:a:b"] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad}");
        }
        // A namespace may be called vxlan: without KEY=VALUE it is a TAP.
        let p: PortSpec = "t=vxlan:eth0".parse().unwrap();
        assert!(matches!(p.kind, PortKind::Tap { netns, .. } if netns == "vxlan"));
        let p: PortSpec = "wan=vxlan:vni=42,local=vf-ul:10.99.0.1,remote=10.99.0.2"
            .parse()
            .unwrap();
        let PortKind::Vxlan(v) = p.kind else {
            panic!("not a tunnel")
        };
        assert_eq!((v.vni.get(), v.remotes.len()), (42, 1));
        let p: PortSpec = "vm1=qemu-stream:/run/x/vm1.sock".parse().unwrap();
        assert_eq!(
            p.kind,
            PortKind::QemuStream {
                path: "/run/x/vm1.sock".into()
            }
        );
        let p: PortSpec = "vm1=qemu-dgram:local=/run/x/sw.sock,remote=/run/x/vm.sock"
            .parse()
            .unwrap();
        assert!(matches!(p.kind, PortKind::QemuDgram(d) if d.remote.ends_with("vm.sock")));
        for bad in ["vm1=qemu-stream:../x", "vm1=qemu-dgram:local=/a"] {
            let e = bad.parse::<PortSpec>().unwrap_err().to_string();
            assert!(e.to_lowercase().starts_with("bad qemu"), "{bad}: {e}");
        }
        let e = "wan=vxlan:vni=42"
            .parse::<PortSpec>()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("bad VXLAN port spec"), "{e}");
        let e = "../x=vxlan:vni=42,local=10.0.0.1,remote=10.0.0.2"
            .parse::<PortSpec>()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("invalid port name"), "{e}");
        for bad in [
            "client",
            "client=vf-client",
            "=ns:eth0",
            "c=ns:",
            "c=ns:averyveryverylongname",
            "c=n/s:eth0",
            "c=..:eth0",
            "c=ns:et h0",
            "../x=ns:eth0",
            "a/b=ns:eth0",
            "Client=ns:eth0",
        ] {
            let e = bad.parse::<PortSpec>().unwrap_err().to_string();
            assert!(
                e.starts_with("bad port spec") || e.starts_with("invalid port name"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn duplicate_ports_are_refused_before_anything_is_created() {
        let cfg = DaemonConfig {
            name: "t".into(),
            ports: vec!["a=ns:eth0".parse().unwrap(), "a=ns2:eth0".parse().unwrap()],
            mirror: None,
            fdb: FdbConfig::default(),
            offload: true,
            threading: crate::switchd::Threading::default(),
            rt_priority: None,
            cpu: None,
            batch: 0,
        };
        assert!(matches!(
            cfg.validate(),
            Err(SwitchdError::DuplicatePort(_))
        ));
        let cfg = DaemonConfig {
            ports: vec![],
            ..cfg
        };
        assert!(matches!(cfg.validate(), Err(SwitchdError::NoPorts)));
    }
}
