//! Topology files (core, pure): what `netns-scripts/up.sh` builds — hosts, clients, the
//! vMotion network and the VMs to create at start — read from TOML and validated.
//!
//! The file is parsed into raw structs whose fields keep their byte spans, then checked
//! as a whole: names (the [`crate::names`] rule, no duplicates, no name the switches'
//! sockets use), references (a VM's host exists), addresses (inside their network,
//! unique) and sizes (every host can hold the VMs the file puts on it, overhead
//! included). Every error names the file, the line and column, and the field, on one
//! line: `four.toml:12:12: host[2].name: duplicate name silo104 (first at line 8)`.
//! Array indexes in field paths count from 1, as a reader counts `[[host]]` tables.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::guest::{Pattern, VmConfig, WorkloadConfig};
use crate::host::admission;
use crate::wire::MacAddr;

/// The built-in topology: today's client, silo104 and silo105 with a veth vMotion link.
pub const DEFAULT_TOML: &str = include_str!("../netns-scripts/topologies/default.toml");
/// What [`DEFAULT_TOML`] is called in messages.
pub const DEFAULT_LABEL: &str = "<built-in default topology>";

/// The VM network: clients, hosts' uplinks (vmnic0) and VMs.
pub const VM_NETWORK: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 0);
/// The vMotion network: the hosts' vmk1.
pub const VMOTION_NETWORK: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 0);
/// The underlay between machines: each machine's "physical" namespace, joined by a veth
/// pair.
pub const UNDERLAY_NETWORK: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 0);
/// The VXLAN segment of the VM network across machines.
pub const VM_VNI: u32 = 42;
/// The VXLAN segment of the vMotion network across machines.
pub const VMOTION_VNI: u32 = 43;
/// UDP port of the vMotion segment's tunnel: a socket per segment (a switch is one
/// segment), so the second takes the kernel's other VXLAN port, its legacy default.
pub const VMOTION_TUNNEL_PORT: u16 = 8472;
/// The TCP control port of host number i (from 0) on a machine's underlay address is
/// this plus i.
pub const CONTROL_PORT_BASE: u16 = 7100;
/// The underlay's MTU: VXLAN's 50 bytes over a 1500-byte inner frame, and room to
/// spare, as NSX asks of its transport network (1600).
pub const UNDERLAY_MTU: u32 = 1600;
/// Prefix length of both networks.
pub const PREFIX_LEN: u8 = 24;
/// Capacity of a host whose entry gives none (up.sh passes VF_HOST_CAPACITY_MB).
pub const DEFAULT_CAPACITY_MB: u64 = 4096;
/// Largest host capacity accepted, MB (1 TiB): beyond it is a typo, not a host.
pub const MAX_CAPACITY_MB: u64 = 1 << 20;
/// Names the fabric's own daemons use for their sockets, pid files and logs.
pub const RESERVED_NAMES: [&str; 2] = ["switch", VMOTION_SWITCH];
/// Name of the vMotion network's switch (its socket is `<run dir>/vmotion.sock`).
pub const VMOTION_SWITCH: &str = "vmotion";
/// Options of `vfabric host` that up.sh sets itself from the file.
const MANAGED_HOST_OPTIONS: [&str; 5] = [
    "--name",
    "--vmotion-addr",
    "--uplink",
    "--capacity-mb",
    "--datastore",
];

/// How the hosts' vmk1 interfaces are joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmotionNetwork {
    /// A vfabric switch of its own, one TAP port per host: any number of hosts.
    Switch,
    /// A veth pair between exactly two hosts.
    Veth,
}

impl fmt::Display for VmotionNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmotionNetwork::Switch => "switch",
            VmotionNetwork::Veth => "veth",
        })
    }
}

/// A validated topology.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Topology {
    pub vmotion: VmotionNetwork,
    /// Empty: one machine. Two: simulated machines joined by a veth underlay, each
    /// with its own switches, tunnelled to the other's over VXLAN.
    pub machines: Vec<MachineSpec>,
    pub clients: Vec<ClientSpec>,
    pub hosts: Vec<HostSpec>,
    pub vms: Vec<VmSpec>,
}

/// A simulated machine: a namespace holding its end of the underlay (its "physical"
/// network, where its VXLAN sockets and its hosts' TCP control listeners live).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineSpec {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
}

/// A client namespace: nothing of ours runs there; its eth0 is a switch port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientSpec {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The machine it is on (None: a topology of one machine).
    pub machine: Option<String>,
}

/// A host namespace and its hypervisor daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostSpec {
    pub name: String,
    /// vmnic0, on the VM network.
    pub ip: Ipv4Addr,
    /// vmk1, on the vMotion network; the daemon listens on port 8000 there.
    pub vmotion_ip: Ipv4Addr,
    pub capacity_mb: u64,
    /// Extra options for `vfabric host`, word by word.
    pub args: Vec<String>,
    /// The machine it is on (None: a topology of one machine).
    pub machine: Option<String>,
}

/// A VM created when the fabric comes up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmSpec {
    pub name: String,
    pub host: String,
    pub ip: Ipv4Addr,
    pub memory_mb: u64,
    pub vcpus: u8,
    pub word_bits: u8,
    /// idle, uniform, hot:PAGES or sweep (as `vfabric vm create --workload`).
    pub workload: String,
    /// Pages per second; `u64::MAX` for "max".
    pub dirty_rate: u64,
}

impl VmSpec {
    /// The VM's configuration as `vfabric vm create` would check it. The MAC is a
    /// stand-in: the CLI derives the VM's own from its name.
    pub fn config(&self) -> VmConfig {
        VmConfig {
            name: self.name.clone(),
            mac: MacAddr([0x02, 0, 0, 0, 0, 1]),
            vcpus: self.vcpus,
            memory_mb: self.memory_mb,
            word_bits: self.word_bits,
            ip: self.ip,
            workload: WorkloadConfig {
                pattern: self.workload.parse().unwrap_or(Pattern::Idle),
                dirty_rate: self.dirty_rate,
            },
        }
    }
}

impl Topology {
    pub fn host(&self, name: &str) -> Option<&HostSpec> {
        self.hosts.iter().find(|h| h.name == name)
    }

    pub fn vm(&self, name: &str) -> Option<&VmSpec> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// The built-in default (today's three namespaces), hosts of `default_capacity_mb`.
    pub fn builtin(default_capacity_mb: u64) -> Topology {
        parse(DEFAULT_LABEL, DEFAULT_TOML, default_capacity_mb)
            .expect("the built-in topology is valid")
    }

    /// The plan as bash assignments for up.sh (`eval`-free: it is sourced). Every value
    /// is single-quoted, so nothing in it is expanded.
    ///
    /// ```text
    /// VF_TOPO_VMOTION='switch'
    /// VF_TOPO_CLIENTS=('client')          VF_TOPO_CLIENT_IPS=('10.10.0.1/24')
    /// VF_TOPO_HOSTS=('silo104' …)         VF_TOPO_HOST_IPS, _VMKS, _CAPACITY
    /// VF_TOPO_HOST_ARGS_0=('--announce' 'rarp')   (one array per host, by index)
    /// VF_TOPO_VMS=('vm1' …)               VF_TOPO_VM_HOSTS, _IPS, _MEMORY, _VCPUS,
    ///                                     _WORD_BITS, _WORKLOADS, _RATES
    /// ```
    pub fn to_shell(&self) -> String {
        fn arr(out: &mut String, var: &str, items: impl IntoIterator<Item = String>) {
            let words: Vec<String> = items.into_iter().map(|s| shell_quote(&s)).collect();
            let _ = writeln!(out, "{var}=({})", words.join(" "));
        }
        let p = PREFIX_LEN;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "VF_TOPO_VMOTION={}",
            shell_quote(&self.vmotion.to_string())
        );
        arr(
            &mut o,
            "VF_TOPO_MACHINES",
            self.machines.iter().map(|m| m.name.clone()),
        );
        arr(
            &mut o,
            "VF_TOPO_MACHINE_IPS",
            self.machines
                .iter()
                .map(|m| format!("{}/{p}", m.underlay_ip)),
        );
        let machine = |m: &Option<String>| m.clone().unwrap_or_default();
        arr(
            &mut o,
            "VF_TOPO_CLIENT_MACHINES",
            self.clients.iter().map(|c| machine(&c.machine)),
        );
        arr(
            &mut o,
            "VF_TOPO_HOST_MACHINES",
            self.hosts.iter().map(|h| machine(&h.machine)),
        );
        let _ = writeln!(
            o,
            "VF_TOPO_VM_VNI={VM_VNI}\nVF_TOPO_VMOTION_VNI={VMOTION_VNI}\n\
             VF_TOPO_VMOTION_TUNNEL_PORT={VMOTION_TUNNEL_PORT}\n\
             VF_TOPO_CONTROL_PORT_BASE={CONTROL_PORT_BASE}\nVF_TOPO_UNDERLAY_MTU={UNDERLAY_MTU}"
        );
        arr(
            &mut o,
            "VF_TOPO_CLIENTS",
            self.clients.iter().map(|c| c.name.clone()),
        );
        arr(
            &mut o,
            "VF_TOPO_CLIENT_IPS",
            self.clients.iter().map(|c| format!("{}/{p}", c.ip)),
        );
        arr(
            &mut o,
            "VF_TOPO_HOSTS",
            self.hosts.iter().map(|h| h.name.clone()),
        );
        arr(
            &mut o,
            "VF_TOPO_HOST_IPS",
            self.hosts.iter().map(|h| format!("{}/{p}", h.ip)),
        );
        arr(
            &mut o,
            "VF_TOPO_HOST_VMKS",
            self.hosts.iter().map(|h| format!("{}/{p}", h.vmotion_ip)),
        );
        arr(
            &mut o,
            "VF_TOPO_HOST_CAPACITY",
            self.hosts.iter().map(|h| h.capacity_mb.to_string()),
        );
        for (i, h) in self.hosts.iter().enumerate() {
            arr(&mut o, &format!("VF_TOPO_HOST_ARGS_{i}"), h.args.clone());
        }
        arr(
            &mut o,
            "VF_TOPO_VMS",
            self.vms.iter().map(|v| v.name.clone()),
        );
        arr(
            &mut o,
            "VF_TOPO_VM_HOSTS",
            self.vms.iter().map(|v| v.host.clone()),
        );
        arr(
            &mut o,
            "VF_TOPO_VM_IPS",
            self.vms.iter().map(|v| v.ip.to_string()),
        );
        arr(
            &mut o,
            "VF_TOPO_VM_MEMORY",
            self.vms.iter().map(|v| v.memory_mb.to_string()),
        );
        arr(
            &mut o,
            "VF_TOPO_VM_VCPUS",
            self.vms.iter().map(|v| v.vcpus.to_string()),
        );
        arr(
            &mut o,
            "VF_TOPO_VM_WORD_BITS",
            self.vms.iter().map(|v| v.word_bits.to_string()),
        );
        arr(
            &mut o,
            "VF_TOPO_VM_WORKLOADS",
            self.vms.iter().map(|v| v.workload.clone()),
        );
        arr(
            &mut o,
            "VF_TOPO_VM_RATES",
            self.vms.iter().map(|v| match v.dirty_rate {
                u64::MAX => "max".to_string(),
                r => r.to_string(),
            }),
        );
        o
    }
}

/// `s` in single quotes, safe to source in bash whatever it holds.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Errors of reading a topology file.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology file {file}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

/// A file that is not a valid topology: where, which field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{} {field}: {message}", .line.map(|(l, c)| format!("{l}:{c}:")).unwrap_or_default())]
pub struct Invalid {
    pub file: String,
    /// Line and column (from 1), when the error has a place in the file.
    pub line: Option<(usize, usize)>,
    /// Dotted path of the field, e.g. `host[2].capacity_mb` (indexes from 1).
    pub field: String,
    pub message: String,
}

/// Reads and validates the topology file at `path`.
pub fn load(path: &std::path::Path, default_capacity_mb: u64) -> Result<Topology, TopologyError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
        file: file.clone(),
        source,
    })?;
    Ok(parse(&file, &text, default_capacity_mb)?)
}

// ---- raw file ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    vmotion: Option<RawVmotion>,
    #[serde(default)]
    machine: Vec<Spanned<RawMachine>>,
    #[serde(default)]
    client: Vec<Spanned<RawClient>>,
    #[serde(default)]
    host: Vec<Spanned<RawHost>>,
    #[serde(default)]
    vm: Vec<Spanned<RawVm>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVmotion {
    network: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMachine {
    name: Spanned<String>,
    underlay_ip: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: Spanned<String>,
    ip: Spanned<String>,
    machine: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: Spanned<String>,
    ip: Spanned<String>,
    vmotion_ip: Option<Spanned<String>>,
    capacity_mb: Option<Spanned<i64>>,
    #[serde(default)]
    args: Vec<Spanned<String>>,
    machine: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: Spanned<String>,
    host: Spanned<String>,
    ip: Spanned<String>,
    memory_mb: Option<Spanned<i64>>,
    vcpus: Option<Spanned<i64>>,
    word_bits: Option<Spanned<i64>>,
    workload: Option<Spanned<String>>,
    dirty_rate: Option<Spanned<toml::Value>>,
}

/// Parses and validates `text`; `file` names it in errors. Hosts without a capacity get
/// `default_capacity_mb`.
pub fn parse(file: &str, text: &str, default_capacity_mb: u64) -> Result<Topology, Invalid> {
    let cx = Cx { file, text };
    let raw: RawFile = toml::from_str(text).map_err(|e| cx.toml_error(&e))?;
    validate(&cx, raw, default_capacity_mb)
}

/// The file being checked, to turn spans into lines.
struct Cx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Cx<'_> {
    fn err(&self, span: Option<Range<usize>>, field: String, message: String) -> Invalid {
        Invalid {
            file: self.file.to_string(),
            line: span.map(|s| line_col(self.text, s.start)),
            field,
            message,
        }
    }

    fn at<T>(&self, s: &Spanned<T>, field: String, message: String) -> Invalid {
        self.err(Some(s.span()), field, message)
    }

    /// A syntax or type error from the TOML parser, as one line.
    fn toml_error(&self, e: &toml::de::Error) -> Invalid {
        // Without the input, the error's Display is its message and then the key path.
        let mut bare = e.clone();
        bare.set_input(None);
        let shown = bare.to_string();
        let keys = shown
            .lines()
            .find_map(|l| l.strip_prefix("in `")?.strip_suffix('`'))
            .map(str::to_string)
            .or_else(|| e.span().and_then(|s| key_at(self.text, s.start)))
            .unwrap_or_default();
        let mut field = keys.clone();
        // An array-of-tables key gains the index of the table the error is in.
        if let (Some(span), Some((table, rest))) =
            (e.span(), Some(keys.split_once('.').unwrap_or((&keys, ""))))
        {
            let n = tables_before(self.text, table, span.start);
            if n > 0 {
                field = if rest.is_empty() {
                    format!("{table}[{n}]")
                } else {
                    format!("{table}[{n}].{rest}")
                };
            }
        }
        let message = e.message().trim().replace('\n', " ");
        // A missing or unknown key is named in the message only: add it to the path.
        if let Some(k) = ["missing field `", "unknown field `"]
            .iter()
            .find_map(|p| message.strip_prefix(p))
            .and_then(|m| m.split('`').next())
            .filter(|k| !field.ends_with(&format!(".{k}")))
        {
            if !field.is_empty() {
                field.push('.');
            }
            field.push_str(k);
        }
        if field.is_empty() {
            field = "(file)".into();
        }
        self.err(e.span(), field, message)
    }
}

/// Line and column (from 1, in characters) of byte `offset` of `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}

/// The dotted key whose line holds byte `offset`, within the table header above it: a
/// syntax error carries no key path of its own.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].split('\n').next().unwrap_or("");
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| {
            l.trim_matches(|c| c == '[' || c == ']' || c == ' ')
                .to_string()
        });
    let key = line
        .split_once('=')
        .filter(|(k, _)| start + k.len() < offset || offset == start)
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (Some(t), None) => Some(t),
        (None, k) => k,
    }
}

/// How many `[[table]]` headers start before byte `offset`.
fn tables_before(text: &str, table: &str, offset: usize) -> usize {
    let mut pos = 0;
    let mut n = 0;
    for line in text.split_inclusive('\n') {
        if pos > offset {
            break;
        }
        let t = line.trim();
        if let Some(inner) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            if inner.trim() == table {
                n += 1;
            }
        }
        pos += line.len();
    }
    n
}

fn parse_ip(
    cx: &Cx,
    s: &Spanned<String>,
    field: String,
    net: Ipv4Addr,
    net_name: &str,
) -> Result<Ipv4Addr, Invalid> {
    let ip: Ipv4Addr = s.get_ref().parse().map_err(|_| {
        cx.at(
            s,
            field.clone(),
            format!("{:?} is not an IPv4 address", s.get_ref()),
        )
    })?;
    let mask = u32::MAX << (32 - PREFIX_LEN);
    let host = u32::from(ip) & !mask;
    if u32::from(ip) & mask != u32::from(net) {
        return Err(cx.at(
            s,
            field,
            format!("{ip} is outside the {net_name} {net}/{PREFIX_LEN}"),
        ));
    }
    if host == 0 || host == !mask {
        return Err(cx.at(
            s,
            field,
            format!("{ip} is the {net_name}'s network or broadcast address"),
        ));
    }
    Ok(ip)
}

fn int_in<T: TryFrom<i64>>(
    cx: &Cx,
    v: &Spanned<i64>,
    field: String,
    range: std::ops::RangeInclusive<i64>,
    what: &str,
) -> Result<T, Invalid> {
    let n = *v.get_ref();
    if !range.contains(&n) {
        return Err(cx.at(
            v,
            field,
            format!(
                "{what} {n} is out of range ({} to {})",
                range.start(),
                range.end()
            ),
        ));
    }
    T::try_from(n).map_err(|_| cx.at(v, field, format!("{what} {n} is out of range")))
}

/// Where a name was first used, for duplicate checks across hosts and clients.
struct Seen {
    kind: &'static str,
    line: usize,
}

fn check_name(
    cx: &Cx,
    s: &Spanned<String>,
    field: &str,
    what: &'static str,
    seen: &mut HashMap<String, Seen>,
) -> Result<String, Invalid> {
    let name = s.get_ref();
    crate::names::validate(what, name).map_err(|e| cx.at(s, field.into(), e.to_string()))?;
    if RESERVED_NAMES.contains(&name.as_str()) {
        return Err(cx.at(
            s,
            field.into(),
            format!(
                "the name {name} is reserved (the fabric's switches use {})",
                RESERVED_NAMES.join(" and ")
            ),
        ));
    }
    let line = line_col(cx.text, s.span().start).0;
    if let Some(first) = seen.get(name) {
        return Err(cx.at(
            s,
            field.into(),
            format!(
                "duplicate name {name} (already a {} at line {})",
                first.kind, first.line
            ),
        ));
    }
    seen.insert(name.clone(), Seen { kind: what, line });
    Ok(name.clone())
}

fn check_unique_ip(
    cx: &Cx,
    s: &Spanned<String>,
    field: &str,
    ip: Ipv4Addr,
    used: &mut HashMap<Ipv4Addr, (String, usize)>,
) -> Result<(), Invalid> {
    let line = line_col(cx.text, s.span().start).0;
    if let Some((by, l)) = used.get(&ip) {
        return Err(cx.at(
            s,
            field.into(),
            format!("duplicate IP {ip} (already {by}'s, line {l})"),
        ));
    }
    used.insert(ip, (field.to_string(), line));
    Ok(())
}

fn validate(cx: &Cx, raw: RawFile, default_capacity_mb: u64) -> Result<Topology, Invalid> {
    let mut names: HashMap<String, Seen> = HashMap::new();
    let mut vm_ips: HashMap<Ipv4Addr, (String, usize)> = HashMap::new();
    let mut vmk_ips: HashMap<Ipv4Addr, (String, usize)> = HashMap::new();

    let mut machines = Vec::new();
    let mut underlay_ips: HashMap<Ipv4Addr, (String, usize)> = HashMap::new();
    for (i, m) in raw.machine.iter().enumerate() {
        let f = |k: &str| format!("machine[{}].{k}", i + 1);
        let m = m.get_ref();
        let name = check_name(cx, &m.name, &f("name"), "machine", &mut names)?;
        let ip = parse_ip(
            cx,
            &m.underlay_ip,
            f("underlay_ip"),
            UNDERLAY_NETWORK,
            "underlay",
        )?;
        check_unique_ip(cx, &m.underlay_ip, &f("underlay_ip"), ip, &mut underlay_ips)?;
        machines.push(MachineSpec {
            name,
            underlay_ip: ip,
        });
    }
    if !machines.is_empty() && machines.len() != 2 {
        return Err(cx.at(
            &raw.machine[0],
            "machine".into(),
            format!(
                "{} [[machine]] tables: a veth underlay joins exactly two machines",
                machines.len()
            ),
        ));
    }
    // Which machine an entry is on: the first when it does not say; none without
    // machines, where the key is a mistake.
    let on_machine = |m: &Option<Spanned<String>>,
                      field: String|
     -> Result<Option<String>, Invalid> {
        match (m, machines.first()) {
            (None, None) => Ok(None),
            (None, Some(first)) => Ok(Some(first.name.clone())),
            (Some(s), None) => Err(cx.at(s, field, "the file has no [[machine]] tables".into())),
            (Some(s), Some(_)) => match machines.iter().find(|x| x.name == *s.get_ref()) {
                Some(x) => Ok(Some(x.name.clone())),
                None => Err(cx.at(
                    s,
                    field,
                    format!(
                        "unknown machine {:?} (the file's machines are {})",
                        s.get_ref(),
                        machines
                            .iter()
                            .map(|m| m.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            },
        }
    };

    let mut clients = Vec::new();
    for (i, c) in raw.client.iter().enumerate() {
        let f = |k: &str| format!("client[{}].{k}", i + 1);
        let c = c.get_ref();
        let name = check_name(cx, &c.name, &f("name"), "client", &mut names)?;
        let ip = parse_ip(cx, &c.ip, f("ip"), VM_NETWORK, "VM network")?;
        check_unique_ip(cx, &c.ip, &f("ip"), ip, &mut vm_ips)?;
        let machine = on_machine(&c.machine, f("machine"))?;
        clients.push(ClientSpec { name, ip, machine });
    }

    if raw.host.is_empty() {
        return Err(cx.err(
            None,
            "host".into(),
            "no [[host]] table: a fabric needs at least one host".into(),
        ));
    }
    let mut hosts = Vec::new();
    for (i, h) in raw.host.iter().enumerate() {
        let f = |k: &str| format!("host[{}].{k}", i + 1);
        let h = h.get_ref();
        let name = check_name(cx, &h.name, &f("name"), "host", &mut names)?;
        let ip = parse_ip(cx, &h.ip, f("ip"), VM_NETWORK, "VM network")?;
        check_unique_ip(cx, &h.ip, &f("ip"), ip, &mut vm_ips)?;
        let vmotion_ip = match &h.vmotion_ip {
            Some(s) => {
                let v = parse_ip(cx, s, f("vmotion_ip"), VMOTION_NETWORK, "vMotion network")?;
                check_unique_ip(cx, s, &f("vmotion_ip"), v, &mut vmk_ips)?;
                v
            }
            None => {
                // Same last byte as the uplink, on the vMotion network.
                let v = Ipv4Addr::from(u32::from(VMOTION_NETWORK) | (u32::from(ip) & 0xff));
                check_unique_ip(cx, &h.ip, &f("vmotion_ip"), v, &mut vmk_ips)?;
                v
            }
        };
        let capacity_mb = match &h.capacity_mb {
            Some(c) => int_in(
                cx,
                c,
                f("capacity_mb"),
                1..=MAX_CAPACITY_MB as i64,
                "capacity",
            )?,
            None => default_capacity_mb,
        };
        for a in &h.args {
            let word = a.get_ref();
            if let Some(opt) = MANAGED_HOST_OPTIONS
                .iter()
                .find(|o| word == *o || word.starts_with(&format!("{o}=")))
            {
                return Err(cx.at(
                    a,
                    f("args"),
                    format!("{opt} is set from the file's other keys, not in args"),
                ));
            }
        }
        let machine = on_machine(&h.machine, f("machine"))?;
        hosts.push(HostSpec {
            name,
            ip,
            vmotion_ip,
            capacity_mb,
            args: h.args.iter().map(|a| a.get_ref().clone()).collect(),
            machine,
        });
    }

    let vmotion = match raw.vmotion.as_ref().and_then(|v| v.network.as_ref()) {
        None => VmotionNetwork::Switch,
        Some(s) => match s.get_ref().as_str() {
            "switch" => VmotionNetwork::Switch,
            "veth" if !machines.is_empty() => {
                return Err(cx.at(
                    s,
                    "vmotion.network".into(),
                    "hosts on two machines meet on a vMotion switch per machine, \
                     tunnelled to each other: use \"switch\""
                        .into(),
                ))
            }
            "veth" if hosts.len() == 2 => VmotionNetwork::Veth,
            "veth" => {
                return Err(cx.at(
                    s,
                    "vmotion.network".into(),
                    format!(
                        "a veth pair joins exactly two hosts, not {}; use \"switch\"",
                        hosts.len()
                    ),
                ))
            }
            other => {
                return Err(cx.at(
                    s,
                    "vmotion.network".into(),
                    format!("{other:?} is not \"switch\" or \"veth\""),
                ))
            }
        },
    };

    let mut vms = Vec::new();
    let mut vm_names: HashMap<String, Seen> = HashMap::new();
    let mut used_mb: HashMap<String, u64> = HashMap::new();
    for (i, v) in raw.vm.iter().enumerate() {
        let f = |k: &str| format!("vm[{}].{k}", i + 1);
        let v = v.get_ref();
        let name = v.name.get_ref();
        crate::names::validate("VM", name).map_err(|e| cx.at(&v.name, f("name"), e.to_string()))?;
        if let Some(first) = vm_names.get(name) {
            return Err(cx.at(
                &v.name,
                f("name"),
                format!("duplicate VM name {name} (first at line {})", first.line),
            ));
        }
        vm_names.insert(
            name.clone(),
            Seen {
                kind: "VM",
                line: line_col(cx.text, v.name.span().start).0,
            },
        );
        let host = hosts
            .iter()
            .find(|h| h.name == *v.host.get_ref())
            .ok_or_else(|| {
                cx.at(
                    &v.host,
                    f("host"),
                    format!(
                        "unknown host {:?} (the file's hosts are {})",
                        v.host.get_ref(),
                        hosts
                            .iter()
                            .map(|h| h.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
        let ip = parse_ip(cx, &v.ip, f("ip"), VM_NETWORK, "VM network")?;
        check_unique_ip(cx, &v.ip, &f("ip"), ip, &mut vm_ips)?;
        let memory_mb: u64 = match &v.memory_mb {
            Some(m) => int_in(
                cx,
                m,
                f("memory_mb"),
                crate::guest::MIN_MEMORY_MB as i64..=crate::guest::MAX_MEMORY_MB as i64,
                "memory",
            )?,
            None => 256,
        };
        let vcpus: u8 = match &v.vcpus {
            Some(n) if matches!(n.get_ref(), 1 | 2 | 4) => *n.get_ref() as u8,
            Some(n) => {
                return Err(cx.at(
                    n,
                    f("vcpus"),
                    format!("{} vCPUs: must be 1, 2 or 4", n.get_ref()),
                ))
            }
            None => 1,
        };
        let word_bits: u8 = match &v.word_bits {
            Some(n) if matches!(n.get_ref(), 32 | 64) => *n.get_ref() as u8,
            Some(n) => {
                return Err(cx.at(
                    n,
                    f("word_bits"),
                    format!("{} bits: must be 32 or 64", n.get_ref()),
                ))
            }
            None => 64,
        };
        let workload = match &v.workload {
            Some(w) => {
                let p: Pattern = w.get_ref().parse().map_err(|e: crate::guest::GuestError| {
                    cx.at(w, f("workload"), e.to_string())
                })?;
                (p.to_string(), Some(w))
            }
            None => ("sweep".to_string(), None),
        };
        let dirty_rate = match &v.dirty_rate {
            None => 1000,
            Some(r) => match r.get_ref() {
                toml::Value::Integer(n) if *n >= 0 => *n as u64,
                toml::Value::String(s) if s == "max" => u64::MAX,
                other => {
                    return Err(cx.at(
                        r,
                        f("dirty_rate"),
                        format!("{other} is not a number of pages per second or \"max\""),
                    ))
                }
            },
        };
        let spec = VmSpec {
            name: name.clone(),
            host: host.name.clone(),
            ip,
            memory_mb,
            vcpus,
            word_bits,
            workload: workload.0,
            dirty_rate,
        };
        // What `vm create` would refuse (a hot set larger than the VM, …).
        if let Err(e) = spec.config().validate() {
            let (field, span) = match e {
                crate::guest::GuestError::BadHotSet { .. } => {
                    (f("workload"), workload.1.map(|w| w.span()))
                }
                _ => (f("name"), Some(v.name.span())),
            };
            return Err(cx.err(span, field, e.to_string()));
        }
        let need = admission::reservation(vcpus, memory_mb, word_bits)
            .map_err(|e| cx.at(&v.memory_mb_or_name(), f("memory_mb"), e.to_string()))?;
        let used = used_mb.entry(host.name.clone()).or_insert(0);
        admission::check_room_for(&host.name, host.capacity_mb, *used, name, need)
            .map_err(|e| cx.at(&v.host, f("host"), e.to_string()))?;
        *used += need.total_mb();
        vms.push(spec);
    }

    Ok(Topology {
        vmotion,
        machines,
        clients,
        hosts,
        vms,
    })
}

impl RawVm {
    /// The memory key if present, else the name: where a reservation error points.
    fn memory_mb_or_name(&self) -> Spanned<()> {
        let span = match &self.memory_mb {
            Some(m) => m.span(),
            None => self.name.span(),
        };
        Spanned::new(span, ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> Invalid {
        parse("t.toml", text, DEFAULT_CAPACITY_MB).unwrap_err()
    }

    const TWO: &str = r#"
[[client]]
name = "client"
ip = "10.10.0.1"

[[host]]
name = "a"
ip = "10.10.0.11"

[[host]]
name = "b"
ip = "10.10.0.12"
capacity_mb = 512
"#;

    #[test]
    fn the_builtin_default_is_todays_fabric() {
        let t = Topology::builtin(4096);
        assert_eq!(t.vmotion, VmotionNetwork::Veth);
        assert_eq!(
            t.clients,
            vec![ClientSpec {
                name: "client".into(),
                ip: Ipv4Addr::new(10, 10, 0, 1),
                machine: None,
            }]
        );
        let h: Vec<_> = t
            .hosts
            .iter()
            .map(|h| (h.name.as_str(), h.ip, h.vmotion_ip, h.capacity_mb))
            .collect();
        assert_eq!(
            h,
            vec![
                (
                    "silo104",
                    Ipv4Addr::new(10, 10, 0, 104),
                    Ipv4Addr::new(10, 20, 0, 104),
                    4096
                ),
                (
                    "silo105",
                    Ipv4Addr::new(10, 10, 0, 105),
                    Ipv4Addr::new(10, 20, 0, 105),
                    4096
                ),
            ]
        );
        assert!(t.vms.is_empty());
        assert_eq!(Topology::builtin(1000).hosts[0].capacity_mb, 1000);
    }

    #[test]
    fn two_machines_place_every_host_and_client_on_one() {
        let text = include_str!("../netns-scripts/topologies/two-machines.toml");
        let t = parse("two-machines.toml", text, DEFAULT_CAPACITY_MB).unwrap();
        assert_eq!(t.machines.len(), 2);
        assert_eq!(t.machines[1].underlay_ip, Ipv4Addr::new(10, 30, 0, 2));
        assert_eq!(t.host("silo105").unwrap().machine.as_deref(), Some("b"));
        assert_eq!(t.clients[0].machine.as_deref(), Some("a"));
        let sh = t.to_shell();
        assert!(sh.contains("VF_TOPO_HOST_MACHINES=('a' 'b')"), "{sh}");
        assert!(
            sh.contains("VF_TOPO_MACHINE_IPS=('10.30.0.1/24' '10.30.0.2/24')"),
            "{sh}"
        );
        // One machine: no machine keys, and none in the plan.
        let one = Topology::builtin(DEFAULT_CAPACITY_MB);
        assert!(one.machines.is_empty() && one.hosts.iter().all(|h| h.machine.is_none()));
        let base = "[[machine]]\nname = \"a\"\nunderlay_ip = \"10.30.0.1\"\n\
                    [[machine]]\nname = \"b\"\nunderlay_ip = \"10.30.0.2\"\n";
        let host = |extra: &str| format!("[[host]]\nname = \"h1\"\nip = \"10.10.0.2\"\n{extra}");
        let err = |text: &str| parse("t.toml", text, 1024).unwrap_err().to_string();
        // A host that does not say is on the first machine.
        let t = parse("t.toml", &format!("{base}{}", host("")), 1024).unwrap();
        assert_eq!(t.hosts[0].machine.as_deref(), Some("a"));
        let e = err(&format!("{base}{}", host("machine = \"c\"\n")));
        assert!(e.contains("host[1].machine: unknown machine \"c\""), "{e}");
        let e = err(&host("machine = \"a\"\n"));
        assert!(e.contains("no [[machine]] tables"), "{e}");
        let e = err(&format!(
            "[[machine]]\nname = \"a\"\nunderlay_ip = \"10.30.0.1\"\n{}",
            host("")
        ));
        assert!(e.contains("exactly two machines"), "{e}");
        let e = err(&format!(
            "{base}[[machine]]\nname = \"h1\"\nunderlay_ip = \"10.30.0.3\"\n{}",
            host("")
        ));
        assert!(
            e.contains("duplicate name") || e.contains("exactly two"),
            "{e}"
        );
        let e = err(&format!(
            "{}{}",
            base.replace("10.30.0.2", "10.30.0.1"),
            host("")
        ));
        assert!(e.contains("duplicate IP 10.30.0.1"), "{e}");
        let e = err(&format!(
            "[vmotion]\nnetwork = \"veth\"\n{base}{}",
            host("")
        ));
        assert!(e.contains("vMotion switch per machine"), "{e}");
        let e = err(&format!(
            "{}{}",
            base.replace("10.30.0.2", "10.20.0.2"),
            host("")
        ));
        assert!(e.contains("outside the underlay"), "{e}");
    }

    #[test]
    fn the_shipped_four_host_example_is_valid() {
        let text = include_str!("../netns-scripts/topologies/four-hosts.toml");
        let t = parse("four-hosts.toml", text, DEFAULT_CAPACITY_MB).unwrap();
        assert_eq!(t.hosts.len(), 4);
        assert_eq!(t.vms.len(), 8);
        assert_eq!(t.vmotion, VmotionNetwork::Switch);
        assert!(t.vms.iter().all(|v| (64..=128).contains(&v.memory_mb)));
        assert_eq!(t.host("silo107").unwrap().args, vec!["--announce", "rarp"]);
        assert_eq!(
            t.host("silo106").unwrap().vmotion_ip,
            Ipv4Addr::new(10, 20, 0, 106)
        );
    }

    #[test]
    fn defaults_fill_what_a_file_leaves_out() {
        let t = parse("t.toml", TWO, 2048).unwrap();
        assert_eq!(t.vmotion, VmotionNetwork::Switch, "switch unless told");
        assert_eq!(t.hosts[0].capacity_mb, 2048);
        assert_eq!(t.hosts[1].capacity_mb, 512);
        assert_eq!(t.hosts[1].vmotion_ip, Ipv4Addr::new(10, 20, 0, 12));
        let t = parse(
            "t.toml",
            &format!("{TWO}\n[[vm]]\nname = \"v\"\nhost = \"a\"\nip = \"10.10.0.50\"\n"),
            2048,
        )
        .unwrap();
        let v = &t.vms[0];
        assert_eq!(
            (
                v.memory_mb,
                v.vcpus,
                v.word_bits,
                v.workload.as_str(),
                v.dirty_rate
            ),
            (256, 1, 64, "sweep", 1000),
            "the defaults of vfabric vm create"
        );
    }

    #[test]
    fn malformed_toml_names_line_and_column() {
        let e = err("[[host]]\nname = \"a\"\nip = 10.10.0.1\n");
        assert_eq!(e.line.map(|l| l.0), Some(3), "{e}");
        assert_eq!(e.field, "host[1].ip", "{e}");
        let s = e.to_string();
        assert!(s.starts_with("t.toml:3:"), "{s}");
        assert!(!s.contains('\n'), "one line: {s}");
        let e = err("[[host]\nname = \"a\"\n");
        assert_eq!(e.line.map(|l| l.0), Some(1), "{e}");
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn wrong_types_and_unknown_keys_name_the_field() {
        let e = err(&TWO.replace("capacity_mb = 512", "capacity_mb = \"lots\""));
        assert_eq!(e.field, "host[2].capacity_mb", "{e}");
        assert_eq!(e.line.unwrap().0, 13, "{e}");
        let e = err(&TWO.replace("capacity_mb = 512", "capcity_mb = 512"));
        assert_eq!(e.field, "host[2].capcity_mb", "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
        assert_eq!(e.line.unwrap().0, 13, "{e}");
        let e = err("[[host]]\nip = \"10.10.0.2\"\n");
        assert_eq!(e.field, "host[1].name", "{e}");
        assert!(e.message.contains("missing field"), "{e}");
    }

    #[test]
    fn duplicate_host_is_refused_where_it_repeats() {
        let e = err(&TWO.replace("name = \"b\"", "name = \"a\""));
        assert_eq!(e.field, "host[2].name");
        assert_eq!(e.line, Some((11, 8)));
        assert!(
            e.message
                .contains("duplicate name a (already a host at line 7)"),
            "{e}"
        );
        // Hosts and clients share the namespace prefix: one name space.
        let e = err(&TWO.replace("name = \"b\"", "name = \"client\""));
        assert!(e.message.contains("already a client at line 3"), "{e}");
    }

    #[test]
    fn unknown_host_of_a_vm_is_refused() {
        let e = err(&format!(
            "{TWO}\n[[vm]]\nname = \"v\"\nhost = \"c\"\nip = \"10.10.0.50\"\n"
        ));
        assert_eq!(e.field, "vm[1].host");
        assert_eq!(e.line.unwrap().0, 17);
        assert!(e.message.contains("unknown host \"c\""), "{e}");
        assert!(e.message.contains("a, b"), "{e}");
    }

    #[test]
    fn bad_and_reserved_names_are_refused() {
        let e = err(&TWO.replace("name = \"b\"", "name = \"Silo/5\""));
        assert_eq!(e.field, "host[2].name");
        assert!(e.message.starts_with("invalid host name"), "{e}");
        let e = err(&TWO.replace("name = \"b\"", "name = \"vmotion\""));
        assert!(e.message.contains("reserved"), "{e}");
        let e = err(&format!(
            "{TWO}\n[[vm]]\nname = \"VM 1\"\nhost = \"a\"\nip = \"10.10.0.50\"\n"
        ));
        assert_eq!(e.field, "vm[1].name");
        assert!(e.message.starts_with("invalid VM name"), "{e}");
    }

    #[test]
    fn duplicate_and_stray_ips_are_refused() {
        let e = err(&TWO.replace("10.10.0.12", "10.10.0.11"));
        assert_eq!(e.field, "host[2].ip");
        assert_eq!(e.line, Some((12, 6)));
        assert!(
            e.message
                .contains("duplicate IP 10.10.0.11 (already host[1].ip's, line 8)"),
            "{e}"
        );
        // A VM on a host's address.
        let e = err(&format!(
            "{TWO}\n[[vm]]\nname = \"v\"\nhost = \"a\"\nip = \"10.10.0.1\"\n"
        ));
        assert_eq!(e.field, "vm[1].ip");
        assert!(e.message.contains("client[1].ip"), "{e}");
        let e = err(&TWO.replace("10.10.0.12", "10.30.0.12"));
        assert!(
            e.message.contains("outside the VM network 10.10.0.0/24"),
            "{e}"
        );
        let e = err(&TWO.replace("10.10.0.12", "10.10.0.255"));
        assert!(e.message.contains("broadcast"), "{e}");
        let e = err(&TWO.replace("10.10.0.12", "ten"));
        assert!(e.message.contains("not an IPv4 address"), "{e}");
        // Two vMotion addresses alike, one derived, one given.
        let e = err(&TWO.replace(
            "capacity_mb = 512",
            "capacity_mb = 512\nvmotion_ip = \"10.20.0.11\"",
        ));
        assert_eq!(e.field, "host[2].vmotion_ip");
        let e = err(&TWO.replace("capacity_mb = 512", "vmotion_ip = \"10.10.0.40\""));
        assert!(e.message.contains("outside the vMotion network"), "{e}");
    }

    #[test]
    fn capacities_and_vm_sizes_must_be_sane() {
        for bad in ["0", "-5", "9999999999"] {
            let e = err(&TWO.replace("capacity_mb = 512", &format!("capacity_mb = {bad}")));
            assert_eq!(e.field, "host[2].capacity_mb", "{bad}: {e}");
        }
        // 512 MB holds one 256 MB VM with its overhead, not two.
        let vm = |n: u32| {
            format!(
                "\n[[vm]]\nname = \"v{n}\"\nhost = \"b\"\nip = \"10.10.0.{}\"\nmemory_mb = 256\n",
                50 + n
            )
        };
        assert!(parse("t.toml", &format!("{TWO}{}", vm(1)), 4096).is_ok());
        let e = err(&format!("{TWO}{}{}", vm(1), vm(2)));
        assert_eq!(e.field, "vm[2].host", "{e}");
        assert!(e.message.contains("host b has no room for v2"), "{e}");
        let e = err(&format!("{TWO}{}", vm(1).replace("256", "2")));
        assert_eq!(e.field, "vm[1].memory_mb", "{e}");
        let e = err(&format!("{TWO}{}vcpus = 3\n", vm(1)));
        assert_eq!(e.field, "vm[1].vcpus", "{e}");
        let e = err(&format!("{TWO}{}workload = \"hot:999999\"\n", vm(1)));
        assert_eq!(e.field, "vm[1].workload", "{e}");
        let e = err(&format!("{TWO}{}workload = \"busy\"\n", vm(1)));
        assert_eq!(e.field, "vm[1].workload", "{e}");
        let e = err(&format!("{TWO}{}dirty_rate = \"fast\"\n", vm(1)));
        assert_eq!(e.field, "vm[1].dirty_rate", "{e}");
        let t = parse(
            "t.toml",
            &format!("{TWO}{}dirty_rate = \"max\"\n", vm(1)),
            4096,
        )
        .unwrap();
        assert_eq!(t.vms[0].dirty_rate, u64::MAX);
    }

    #[test]
    fn structure_errors() {
        let e = err("[[client]]\nname = \"c\"\nip = \"10.10.0.1\"\n");
        assert_eq!(e.field, "host");
        assert_eq!(e.line, None);
        assert_eq!(
            e.to_string(),
            "t.toml: host: no [[host]] table: a fabric needs at least one host"
        );
        let e = err(&format!("[vmotion]\nnetwork = \"veth\"\n{TWO}").replace(
            "capacity_mb = 512",
            "[[host]]\nname = \"c\"\nip = \"10.10.0.13\"",
        ));
        assert_eq!(e.field, "vmotion.network");
        assert!(e.message.contains("exactly two hosts, not 3"), "{e}");
        let e = err(&format!("[vmotion]\nnetwork = \"vlan\"\n{TWO}"));
        assert_eq!(e.line, Some((2, 11)));
        let e = err(&TWO.replace("capacity_mb = 512", "args = [\"--capacity-mb=9\"]"));
        assert_eq!(e.field, "host[2].args");
        assert!(e.message.contains("--capacity-mb is set from"), "{e}");
    }

    #[test]
    fn shell_rendering_quotes_everything() {
        let t = parse(
            "t.toml",
            &TWO.replace(
                "capacity_mb = 512",
                "args = [\"--announce-schedule\", \"0,50 it's\"]",
            ),
            4096,
        )
        .unwrap();
        let s = t.to_shell();
        assert!(s.contains("VF_TOPO_VMOTION='switch'\n"), "{s}");
        assert!(s.contains("VF_TOPO_HOSTS=('a' 'b')\n"), "{s}");
        assert!(
            s.contains("VF_TOPO_HOST_IPS=('10.10.0.11/24' '10.10.0.12/24')\n"),
            "{s}"
        );
        assert!(
            s.contains("VF_TOPO_HOST_VMKS=('10.20.0.11/24' '10.20.0.12/24')\n"),
            "{s}"
        );
        assert!(s.contains("VF_TOPO_HOST_ARGS_0=()\n"), "{s}");
        assert!(
            s.contains(r"VF_TOPO_HOST_ARGS_1=('--announce-schedule' '0,50 it'\''s')"),
            "{s}"
        );
        assert!(s.contains("VF_TOPO_VMS=()\n"), "{s}");
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
        assert_eq!(line_col("x", 99), (1, 2));
    }
}
