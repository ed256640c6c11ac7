//! The switch daemon (adapter): ports, threads, clocks and the control socket around the
//! sans-IO [`crate::switch`] core.
//!
//! Data path ([`datapath`]): threads that read the ports, ask the core where each frame
//! goes and write it out, with no queue and no allocation per frame.
//!
//! Control path ([`daemon`]): a tokio runtime serves the control socket, runs the ageing
//! sweep once a second (so entries age without traffic) and waits for SIGINT/SIGTERM.

pub mod api;
pub mod daemon;
pub mod datapath;

use serde::{Deserialize, Serialize};

use crate::switch::PortId;

pub use daemon::{run, DaemonConfig, PortSpec, SwitchdError};
pub use datapath::{
    DataPathOptions, Fabric, FabricError, PortCounters, Removed, SwitchPort, Threading, MAX_FRAME,
    MOVE_LINES_PER_SEC,
};

/// The switch's name when none is given: its control socket is `<run dir>/switch.sock`.
pub const DEFAULT_NAME: &str = "switch";

/// Counters of one port as shown by `vfabric ports`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PortStats {
    pub port: String,
    pub id: PortId,
    pub ifname: String,
    pub netns: String,
    pub up: bool,
    /// The interface is operationally up (floods skip it while not).
    #[serde(default = "yes")]
    pub link_up: bool,
    /// What the port is: `tap`, `attach`, `vxlan`, …
    #[serde(default)]
    pub kind: String,
    pub offload: bool,
    /// The interface's MTU as the switch last read it (0: unknown).
    #[serde(default)]
    pub mtu: u32,
    pub fdb_entries: usize,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub flooded: u64,
    pub rx_errors: u64,
    /// Dropped frames by reason (only reasons seen).
    pub dropped: std::collections::BTreeMap<String, u64>,
    /// The VXLAN segment, socket and remote endpoints of a tunnel port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<crate::port::vxlan::VxlanSpec>,
}

fn yes() -> bool {
    true
}

/// One FDB entry as shown by `vfabric fdb show`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FdbRow {
    pub mac: crate::wire::MacAddr,
    pub port: String,
    pub port_id: PortId,
    /// The remote endpoint `mac` was learned behind, on a tunnel port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<std::net::SocketAddrV4>,
    /// Seconds since a frame from `mac` was last seen.
    pub age_s: f64,
    /// When `mac` was learned on `port` or last moved there: µs since the epoch, taken
    /// as the frame that did it was read (the `t_us` of its `mac learned`/`mac moved`
    /// log line). 0 from a daemon that predates the field.
    #[serde(default)]
    pub updated_t_us: u64,
}
