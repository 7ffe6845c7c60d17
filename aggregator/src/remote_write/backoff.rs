//! How long a sender waits before trying a request again.

use std::time::Duration;

/// The pause before retry number `attempt` (1 for the first retry): the receiver's
/// `Retry-After` when it gave one, capped at `max_backoff`; otherwise `min_backoff`
/// doubled per attempt up to `max_backoff`, with jitter so that many senders cut off
/// together do not come back in lockstep. Always within `[min_backoff, max_backoff]`.
pub fn backoff(
    min: Duration,
    max: Duration,
    attempt: u32,
    retry_after: Option<Duration>,
) -> Duration {
    if let Some(after) = retry_after.filter(|d| !d.is_zero()) {
        return after.clamp(min, max);
    }
    let base = min
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(30))
        .min(max);
    base.mul_f64(0.5 + rand::random::<f64>() * 0.5)
        .clamp(min, max)
}
