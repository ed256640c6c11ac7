//! Control-socket messages of the switch daemon (shared by the daemon and the CLI).

use serde::{Deserialize, Serialize};

/// A request to the switch daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SwitchRequest {
    /// Reply: `Vec<FdbRow>`.
    FdbShow,
    /// Reply: `{"flushed": n}`.
    FdbFlush,
    /// Reply: `Vec<PortStats>`.
    Ports,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let t = serde_json::to_string(&SwitchRequest::FdbShow).unwrap();
        assert_eq!(t, r#"{"op":"fdb_show"}"#);
        let r: SwitchRequest = serde_json::from_str(r#"{"op":"ports"}"#).unwrap();
        assert_eq!(r, SwitchRequest::Ports);
    }
}
