//! Service discovery configs beyond `static_configs` and `file_sd_configs`, each with
//! Prometheus's fields.

pub mod kubernetes;
