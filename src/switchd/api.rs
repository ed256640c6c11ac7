//! Control API of the switch daemon, shared by the daemon and its clients: one type per
//! request, naming its reply (see [`crate::control::Request`]).

use serde::{Deserialize, Serialize};

use super::{FdbRow, PortStats};
use crate::switch::PortId;

/// A request to the switch daemon, tagged by `op`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SwitchRequest {
    FdbShow(FdbShow),
    FdbFlush(FdbFlush),
    Ports(Ports),
    PortAdd(PortAdd),
    PortDel(PortDel),
}

/// The forwarding table.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FdbShow {}

/// Empty the forwarding table.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FdbFlush {}

/// Every port and its counters (the mirror last).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ports {}

/// Add a port to the running switch: `spec` as `--port` takes it (`NAME=NETNS:IFNAME`,
/// `NAME=attach:NETNS:IFNAME`, `NAME=vxlan:…`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortAdd {
    pub spec: String,
}

/// Delete a port of the running switch; its FDB entries are flushed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortDel {
    pub name: String,
}

/// Reply to [`PortAdd`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortAdded {
    pub port: String,
    pub id: PortId,
    pub ifname: String,
    pub kind: String,
}

/// Reply to [`PortDel`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortDeleted {
    pub port: String,
    pub fdb_entries_removed: usize,
}

/// Why a port could not be added or deleted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("{0}")]
    Spec(String),
    #[error("port {0:?} exists already")]
    Exists(String),
    #[error("no port {0:?}")]
    NoSuchPort(String),
    #[error("{0}")]
    Failed(String),
}

/// Reply to [`FdbFlush`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Flushed {
    pub flushed: usize,
}

crate::api_requests!(SwitchRequest:
    FdbShow => Vec<FdbRow>,
    FdbFlush => Flushed,
    Ports => Vec<PortStats>,
    PortAdd => PortAdded,
    PortDel => PortDeleted,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let t = serde_json::to_string(&SwitchRequest::from(FdbShow {})).unwrap();
        assert_eq!(t, r#"{"op":"fdb_show"}"#);
        let r: SwitchRequest = serde_json::from_str(r#"{"op":"ports"}"#).unwrap();
        assert_eq!(r, SwitchRequest::Ports(Ports {}));
    }
}
