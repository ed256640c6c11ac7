//! (placeholder)

pub mod nic;
