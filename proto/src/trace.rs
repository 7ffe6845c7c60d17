//! What an agent saw during a failed probe: the steps it took (the DNS answer, each
//! connect attempt, the TLS error, the HTTP status line, the start of a body that failed
//! a regexp) and the network path to the address that failed.
//!
//! Both sides use this one model. The agent builds it with [`Trace::push`], which keeps
//! it within the bounds below whatever a target answers; the aggregator reads it from an
//! untrusted agent with [`Trace::from_pb`], which refuses a trace that breaks them and
//! makes every string printable. A prober adds a kind of step by adding a variant to
//! [`Step`] (and to `TraceStep` in `fleet.proto`).

use crate::pb;
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};

/// Steps kept per trace; later steps are dropped (a redirect loop, many addresses).
pub const MAX_STEPS: usize = 32;
/// Addresses kept per DNS answer.
pub const MAX_ANSWER_ADDRESSES: usize = 16;
/// Hops per path: the traceroute's TTL limit.
pub const MAX_HOPS: usize = 32;
/// Bytes of one text field (an error, a status line); longer ones are cut.
pub const MAX_TEXT_BYTES: usize = 200;
/// Bytes of a body kept in a trace: enough to recognise a page, too few to carry one.
pub const MAX_BODY_EXCERPT_BYTES: usize = 48;

/// A failed probe's trace.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Trace {
    pub steps: Vec<Step>,
    /// The traceroute to the address that failed, when one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<Path>,
}

/// One thing the probe did and what came of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    Dns {
        name: String,
        addresses: Vec<IpAddr>,
        /// Why the lookup gave no address.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Connect {
        address: SocketAddr,
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        seconds: f64,
    },
    Tls {
        error: String,
    },
    HttpStatus {
        line: String,
    },
    Body {
        excerpt: String,
        regexp: String,
    },
    /// The deadline passed while the probe was in this stage.
    Timeout {
        during: String,
    },
}

/// A traceroute's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Path {
    pub destination: IpAddr,
    pub hops: Vec<Hop>,
    /// The destination itself answered.
    pub reached: bool,
    pub timestamp_ms: i64,
}

impl Path {
    /// The farthest hop that answered: where the path ends when it does not reach.
    pub fn last_hop(&self) -> Option<&Hop> {
        self.hops.iter().rev().find(|h| h.address.is_some())
    }
}

/// One TTL of a traceroute.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hop {
    pub ttl: u8,
    /// `None`: nothing answered at this TTL.
    pub address: Option<IpAddr>,
    pub rtt_seconds: f64,
    /// What answered ("time exceeded", "net unreachable", ...).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub icmp: String,
}

/// Why the aggregator refuses an agent's trace (the result itself is kept).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TraceError {
    #[error("a trace of {0} steps (at most {MAX_STEPS})")]
    TooManySteps(usize),
    #[error("a DNS answer of {0} addresses (at most {MAX_ANSWER_ADDRESSES})")]
    TooManyAddresses(usize),
    #[error("a path of {0} hops (at most {MAX_HOPS})")]
    TooManyHops(usize),
    #[error("a trace step without a kind")]
    EmptyStep,
    #[error("{what} {value:?} is not an address")]
    BadAddress { what: &'static str, value: String },
    #[error("a hop with TTL {0} (1 to {MAX_HOPS})")]
    BadTtl(u32),
    #[error("a duration of {0} seconds")]
    BadDuration(f64),
}

impl Trace {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty() && self.path.is_none()
    }

    /// What the trace holds in memory, roughly: its text and a fixed cost per step and
    /// hop (for bounds that count bytes).
    pub fn weight(&self) -> usize {
        const PER_ITEM: usize = 64;
        let steps: usize = self
            .steps
            .iter()
            .map(|s| {
                PER_ITEM
                    + match s {
                        Step::Dns {
                            name,
                            addresses,
                            error,
                        } => {
                            name.len()
                                + addresses.len() * 16
                                + error.as_ref().map_or(0, String::len)
                        }
                        Step::Connect { error, .. } => error.as_ref().map_or(0, String::len),
                        Step::Tls { error } => error.len(),
                        Step::HttpStatus { line } => line.len(),
                        Step::Body { excerpt, regexp } => excerpt.len() + regexp.len(),
                        Step::Timeout { during } => during.len(),
                    }
            })
            .sum();
        let hops = self.path.as_ref().map_or(0, |p| {
            PER_ITEM
                + p.hops
                    .iter()
                    .map(|h| PER_ITEM + h.icmp.len())
                    .sum::<usize>()
        });
        std::mem::size_of::<Self>() + steps + hops
    }

    /// Adds a step, its text made printable and cut to the bounds; past [`MAX_STEPS`]
    /// steps are dropped.
    pub fn push(&mut self, step: Step) {
        if self.steps.len() < MAX_STEPS {
            self.steps.push(step.bounded());
        }
    }

    /// Replaces the step at `index` (one that [`Trace::push`] kept), e.g. an attempt
    /// noted before it started, by its outcome.
    pub fn replace(&mut self, index: usize, step: Step) {
        if let Some(slot) = self.steps.get_mut(index) {
            *slot = step.bounded();
        }
    }

    /// The address the probe last tried to connect to: where a traceroute should go.
    pub fn last_connect_address(&self) -> Option<SocketAddr> {
        self.steps.iter().rev().find_map(|s| match s {
            Step::Connect { address, .. } => Some(*address),
            _ => None,
        })
    }

    pub fn to_pb(&self) -> pb::FailureTrace {
        use pb::trace_step::Step as S;
        let steps = self
            .steps
            .iter()
            .map(|s| pb::TraceStep {
                step: Some(match s {
                    Step::Dns {
                        name,
                        addresses,
                        error,
                    } => S::Dns(pb::DnsAnswer {
                        name: name.clone(),
                        addresses: addresses.iter().map(IpAddr::to_string).collect(),
                        error: error.clone().unwrap_or_default(),
                    }),
                    Step::Connect {
                        address,
                        ok,
                        error,
                        seconds,
                    } => S::Connect(pb::ConnectAttempt {
                        address: address.to_string(),
                        ok: *ok,
                        error: error.clone().unwrap_or_default(),
                        seconds: *seconds,
                    }),
                    Step::Tls { error } => S::Tls(error.clone()),
                    Step::HttpStatus { line } => S::HttpStatus(line.clone()),
                    Step::Body { excerpt, regexp } => S::Body(pb::BodyExcerpt {
                        excerpt: excerpt.clone(),
                        regexp: regexp.clone(),
                    }),
                    Step::Timeout { during } => S::Timeout(during.clone()),
                }),
            })
            .collect();
        pb::FailureTrace {
            steps,
            path: self.path.as_ref().map(|p| pb::TracePath {
                destination: p.destination.to_string(),
                hops: p
                    .hops
                    .iter()
                    .map(|h| pb::TraceHop {
                        ttl: u32::from(h.ttl),
                        address: h.address.map(|a| a.to_string()).unwrap_or_default(),
                        rtt_seconds: h.rtt_seconds,
                        icmp: h.icmp.clone(),
                    })
                    .collect(),
                reached: p.reached,
                timestamp_ms: p.timestamp_ms,
            }),
        }
    }

    /// Reads a trace from an untrusted peer: counts over the bounds, an address that
    /// does not parse or a TTL out of range refuse it whole; text is made printable and
    /// cut, so what is kept can be shown anywhere.
    pub fn from_pb(t: pb::FailureTrace) -> Result<Self, TraceError> {
        use pb::trace_step::Step as S;
        if t.steps.len() > MAX_STEPS {
            return Err(TraceError::TooManySteps(t.steps.len()));
        }
        let mut steps = Vec::with_capacity(t.steps.len());
        for s in t.steps {
            let step = match s.step.ok_or(TraceError::EmptyStep)? {
                S::Dns(d) => {
                    if d.addresses.len() > MAX_ANSWER_ADDRESSES {
                        return Err(TraceError::TooManyAddresses(d.addresses.len()));
                    }
                    Step::Dns {
                        name: d.name,
                        addresses: d
                            .addresses
                            .iter()
                            .map(|a| parse_ip("a DNS answer's address", a))
                            .collect::<Result<_, _>>()?,
                        error: non_empty(d.error),
                    }
                }
                S::Connect(c) => Step::Connect {
                    address: c.address.parse().map_err(|_| TraceError::BadAddress {
                        what: "a connect attempt's address",
                        value: text(&c.address),
                    })?,
                    ok: c.ok,
                    error: non_empty(c.error),
                    seconds: seconds(c.seconds)?,
                },
                S::Tls(error) => Step::Tls { error },
                S::HttpStatus(line) => Step::HttpStatus { line },
                S::Body(b) => Step::Body {
                    excerpt: b.excerpt,
                    regexp: b.regexp,
                },
                S::Timeout(during) => Step::Timeout { during },
            };
            steps.push(step.bounded());
        }
        let path = match t.path {
            None => None,
            Some(p) => {
                if p.hops.len() > MAX_HOPS {
                    return Err(TraceError::TooManyHops(p.hops.len()));
                }
                let mut hops = Vec::with_capacity(p.hops.len());
                for h in p.hops {
                    let ttl = u8::try_from(h.ttl)
                        .ok()
                        .filter(|t| (1..=MAX_HOPS as u8).contains(t))
                        .ok_or(TraceError::BadTtl(h.ttl))?;
                    let address = match h.address.as_str() {
                        "" => None,
                        a => Some(parse_ip("a hop's address", a)?),
                    };
                    hops.push(Hop {
                        ttl,
                        address,
                        rtt_seconds: seconds(h.rtt_seconds)?,
                        icmp: text(&h.icmp),
                    });
                }
                Some(Path {
                    destination: parse_ip("a path's destination", &p.destination)?,
                    hops,
                    reached: p.reached,
                    timestamp_ms: p.timestamp_ms,
                })
            }
        };
        Ok(Self { steps, path })
    }
}

impl Step {
    /// The same step with every text printable and within its bound.
    fn bounded(self) -> Self {
        match self {
            Step::Dns {
                name,
                mut addresses,
                error,
            } => {
                addresses.truncate(MAX_ANSWER_ADDRESSES);
                Step::Dns {
                    name: text(&name),
                    addresses,
                    error: error.as_deref().map(text),
                }
            }
            Step::Connect {
                address,
                ok,
                error,
                seconds,
            } => Step::Connect {
                address,
                ok,
                error: error.as_deref().map(text),
                seconds,
            },
            Step::Tls { error } => Step::Tls {
                error: text(&error),
            },
            Step::HttpStatus { line } => Step::HttpStatus { line: text(&line) },
            Step::Body { excerpt, regexp } => Step::Body {
                excerpt: cut(&printable(excerpt.as_bytes()), MAX_BODY_EXCERPT_BYTES * 4),
                regexp: text(&regexp),
            },
            Step::Timeout { during } => Step::Timeout {
                during: text(&during),
            },
        }
    }
}

/// The first bytes of a body as printable text: printable ASCII as it is, anything
/// else (control bytes, UTF-8 sequences, binary) as `\n` or `\xNN`, so that the excerpt
/// cannot carry terminal escapes or invisible characters. Applied to its own output it
/// changes nothing, so both sides can apply it.
pub fn body_excerpt(body: &[u8]) -> String {
    printable(&body[..body.len().min(MAX_BODY_EXCERPT_BYTES)])
}

fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// A text field made safe to show: control characters replaced, cut to
/// [`MAX_TEXT_BYTES`] on a character boundary.
fn text(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    cut(&clean, MAX_TEXT_BYTES)
}

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn parse_ip(what: &'static str, s: &str) -> Result<IpAddr, TraceError> {
    s.parse().map_err(|_| TraceError::BadAddress {
        what,
        value: text(s),
    })
}

fn seconds(s: f64) -> Result<f64, TraceError> {
    if s.is_finite() && (0.0..=86_400.0).contains(&s) {
        Ok(s)
    } else {
        Err(TraceError::BadDuration(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Trace {
        let mut t = Trace::default();
        t.push(Step::Dns {
            name: "shop.example".into(),
            addresses: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            error: None,
        });
        t.push(Step::Connect {
            address: "[2001:db8::1]:443".parse().unwrap(),
            ok: false,
            error: Some("connection refused".into()),
            seconds: 0.002,
        });
        t.push(Step::HttpStatus {
            line: "HTTP/1.1 500 Internal Server Error".into(),
        });
        t.push(Step::Body {
            excerpt: body_excerpt(b"<html>\x1b[31merror\n"),
            regexp: "ok".into(),
        });
        t.path = Some(Path {
            destination: "192.0.2.1".parse().unwrap(),
            hops: vec![
                Hop {
                    ttl: 1,
                    address: Some("10.0.0.1".parse().unwrap()),
                    rtt_seconds: 0.001,
                    icmp: "time exceeded".into(),
                },
                Hop {
                    ttl: 2,
                    address: None,
                    rtt_seconds: 0.0,
                    icmp: String::new(),
                },
            ],
            reached: false,
            timestamp_ms: 1_700_000_000_000,
        });
        t
    }

    #[test]
    fn a_trace_survives_the_wire() {
        let t = sample();
        assert_eq!(Trace::from_pb(t.to_pb()).unwrap(), t);
        assert_eq!(
            t.path.as_ref().unwrap().last_hop().unwrap().address,
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            t.last_connect_address(),
            Some("[2001:db8::1]:443".parse().unwrap())
        );
    }

    #[test]
    fn body_excerpts_are_short_and_printable() {
        let e = body_excerpt(b"<html>\x1b[31merror\n");
        assert_eq!(e, "<html>\\x1b[31merror\\n");
        let long = body_excerpt(&[b'a'; 1000]);
        assert_eq!(long.len(), MAX_BODY_EXCERPT_BYTES);
        assert_eq!(body_excerpt("é".as_bytes()), "\\xc3\\xa9");
    }

    #[test]
    fn the_agent_side_stays_within_bounds() {
        let mut t = Trace::default();
        for _ in 0..100 {
            t.push(Step::Tls {
                error: "x\u{7}".repeat(1000),
            });
        }
        assert_eq!(t.steps.len(), MAX_STEPS);
        let Step::Tls { error } = &t.steps[0] else {
            panic!()
        };
        assert!(error.len() <= MAX_TEXT_BYTES && !error.contains('\u{7}'));
    }

    #[test]
    fn hostile_traces_are_refused_or_tamed() {
        let mut pb = sample().to_pb();
        pb.steps = (0..MAX_STEPS + 1).map(|_| pb.steps[0].clone()).collect();
        assert_eq!(
            Trace::from_pb(pb),
            Err(TraceError::TooManySteps(MAX_STEPS + 1))
        );

        let mut pb = sample().to_pb();
        pb.path.as_mut().unwrap().hops[0].ttl = 0;
        assert_eq!(Trace::from_pb(pb), Err(TraceError::BadTtl(0)));

        let mut pb = sample().to_pb();
        pb.path.as_mut().unwrap().hops[0].address = "<script>".into();
        assert!(matches!(
            Trace::from_pb(pb),
            Err(TraceError::BadAddress { .. })
        ));

        let mut pb = sample().to_pb();
        pb.steps.push(pb::TraceStep { step: None });
        assert_eq!(Trace::from_pb(pb), Err(TraceError::EmptyStep));

        let mut pb = sample().to_pb();
        if let Some(pb::trace_step::Step::Connect(c)) = &mut pb.steps[1].step {
            c.seconds = f64::NAN;
        }
        assert!(matches!(
            Trace::from_pb(pb),
            Err(TraceError::BadDuration(_))
        ));

        let mut pb = sample().to_pb();
        pb.steps[2].step = Some(pb::trace_step::Step::HttpStatus(
            "HTTP/1.1 200 \u{1b}[2J".to_string() + &"é".repeat(500),
        ));
        if let Some(pb::trace_step::Step::Body(b)) = &mut pb.steps[3].step {
            b.excerpt = "\u{0}".repeat(10_000);
        }
        let t = Trace::from_pb(pb).unwrap();
        let Step::HttpStatus { line } = &t.steps[2] else {
            panic!()
        };
        assert!(line.len() <= MAX_TEXT_BYTES && !line.contains('\u{1b}'));
        let Step::Body { excerpt, .. } = &t.steps[3] else {
            panic!()
        };
        assert!(excerpt.len() <= MAX_BODY_EXCERPT_BYTES * 4);
        assert!(!excerpt.contains('\u{0}'));
    }

    #[test]
    fn json_names_each_kind() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["steps"][0]["kind"], "dns");
        assert_eq!(v["steps"][1]["kind"], "connect");
        assert_eq!(v["steps"][1]["address"], "[2001:db8::1]:443");
        assert_eq!(v["steps"][2]["line"], "HTTP/1.1 500 Internal Server Error");
        assert_eq!(v["path"]["hops"][0]["address"], "10.0.0.1");
        assert_eq!(v["path"]["hops"][1]["address"], serde_json::Value::Null);
    }
}
