//! (placeholder)

pub mod announce;
