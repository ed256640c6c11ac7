//! vfabric: an emulator of vMotion-style live migration on a real virtual network.
//!
//! The crate is split into sans-IO cores, which take time and input as arguments and
//! are tested without root, and thin adapters, which own TAP devices, sockets and clocks:
//!
//! - cores: [`wire`] (frame codecs), [`switch`] (FDB and forwarding decision),
//!   [`memory`] (guest memory and dirty bitmap), [`migration`] (wire protocol,
//!   convergence policy, state machines);
//! - adapters: [`port`] (TAP with virtio-net header, packet socket, in-memory port),
//!   [`switchd`] (the switch daemon), [`host`] (the hypervisor daemon), [`control`]
//!   (the Unix control socket, typed requests), [`events`] (the typed event stream);
//! - [`guest`]: the emulated VM (vCPU workload, NIC responder);
//! - [`topology`]: the topology file `netns-scripts/up.sh` builds from (pure).

pub mod clock;
pub mod control;
pub mod drs;
pub mod errors;
pub mod events;
pub mod guest;
pub mod host;
pub mod logging;
pub mod measure;
pub mod memory;
pub mod migration;
pub mod monitor;
pub mod names;
pub mod pki;
pub mod port;
pub mod switch;
pub mod switchd;
pub mod sys;
pub mod timeline;
pub mod topology;
pub mod wire;
