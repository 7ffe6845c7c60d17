//! The store's old path: it lives in [`crate::storage`] now.

pub use crate::storage::{
    LOCK_FILE, Store, StoreError, StoredAgent, apply_durable, commit_seq, committed_seq,
    forget_agent, save_agent, save_jobs,
};
