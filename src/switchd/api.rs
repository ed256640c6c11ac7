//! Control API of the switch daemon, shared by the daemon and its clients: one type per
//! request, naming its reply (see [`crate::control::Request`]).

use serde::{Deserialize, Serialize};

use super::{FdbRow, PortStats};

/// A request to the switch daemon, tagged by `op`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SwitchRequest {
    FdbShow(FdbShow),
    FdbFlush(FdbFlush),
    Ports(Ports),
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

/// Reply to [`FdbFlush`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Flushed {
    pub flushed: usize,
}

crate::api_requests!(SwitchRequest:
    FdbShow => Vec<FdbRow>,
    FdbFlush => Flushed,
    Ports => Vec<PortStats>,
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
