//! What the agent keeps of one probe between running it and the aggregator's ack.

use crate::probe::Sample;

/// One probe result, numbered for delivery.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeRecord {
    /// Agent-wide, strictly increasing, never reused.
    pub seq: u64,
    pub job: String,
    pub instance: String,
    pub timestamp_ms: i64,
    pub success: bool,
    pub duration_seconds: f64,
    pub samples: Vec<Sample>,
    /// Assignment generation the check came from; 0 for a local job.
    pub generation: u64,
    pub failure: Option<String>,
}

impl ProbeRecord {
    /// An estimate of the memory the record holds, for the buffer's byte limit.
    pub fn approx_bytes(&self) -> usize {
        let samples: usize = self
            .samples
            .iter()
            .map(|s| {
                std::mem::size_of::<Sample>()
                    + s.labels.iter().map(|(_, v)| 24 + v.len()).sum::<usize>()
            })
            .sum();
        std::mem::size_of::<Self>()
            + self.job.len()
            + self.instance.len()
            + self.failure.as_ref().map_or(0, String::len)
            + samples
    }
}
