//! (placeholder)

pub mod admission;
pub mod datastore;
