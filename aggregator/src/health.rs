//! The storage health's old path: it lives in [`crate::storage::health`] now.

pub use crate::storage::health::StorageHealth;
