//! The hypervisor host: admission control, the shared datastore and its disk locks,
//! the control API, and the daemon that runs VMs and migrates them.

pub mod admission;
pub mod api;
pub mod client;
pub mod daemon;
pub mod datastore;
pub mod fleet;
pub mod pause;
pub mod prepared;
pub mod slot;
