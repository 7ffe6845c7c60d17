//! sonde's agent: runs the checks it is assigned (and its own local jobs), and streams
//! every result to its aggregators.

pub mod probe;
