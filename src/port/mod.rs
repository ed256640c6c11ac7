//! (placeholder)

pub mod packet;
