//! Which agents probe a target of a job with `agents_per_target: K`: rendezvous
//! (highest random weight) hashing. Every (agent, target) pair gets a score from a
//! stable hash; a target goes to the K agents with the highest scores. When an agent
//! leaves, only its targets move (each to the next agent in its own ranking); when it
//! comes back, it takes back exactly those. Two aggregators of an HA pair with the same
//! config and the same agents choose the same agents.

/// The `k` agents (or all, if fewer) of `candidates` that probe `instance` of `job`,
/// best first.
pub fn choose<'a>(job: &str, instance: &str, candidates: &[&'a str], k: usize) -> Vec<&'a str> {
    let target = fnv1a(
        fnv1a(FNV_OFFSET, job.as_bytes()) ^ 0xff,
        instance.as_bytes(),
    );
    let mut scored: Vec<(u64, &'a str)> = candidates
        .iter()
        .map(|agent| (mix(fnv1a(target, agent.as_bytes())), *agent))
        .collect();
    // Ties (astronomically rare) are broken by id, so the choice never depends on order.
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().take(k).map(|(_, a)| a).collect()
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// MurmurHash3's finaliser: FNV alone spreads similar ids (edge-1, edge-2) poorly.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn agents(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("edge-{i}")).collect()
    }

    #[test]
    fn each_target_gets_k_distinct_agents_and_the_load_is_even() {
        let ids = agents(5);
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut load: BTreeMap<&str, usize> = BTreeMap::new();
        for t in 0..10_000 {
            let chosen = choose("web", &format!("host-{t}:443"), &refs, 2);
            assert_eq!(chosen.len(), 2);
            assert_ne!(chosen[0], chosen[1]);
            for a in chosen {
                *load.entry(a).or_default() += 1;
            }
        }
        // 20,000 placements over 5 agents: 4,000 each, within a few percent.
        for (agent, n) in load {
            assert!((3_700..=4_300).contains(&n), "{agent} has {n}");
        }
    }

    #[test]
    fn an_agent_leaving_moves_only_its_targets_and_returning_takes_them_back() {
        let ids = agents(5);
        let all: Vec<&str> = ids.iter().map(String::as_str).collect();
        let without: Vec<&str> = all.iter().copied().filter(|a| *a != "edge-3").collect();
        let mut moved = 0;
        for t in 0..2_000 {
            let instance = format!("host-{t}");
            let before = choose("web", &instance, &all, 2);
            let after = choose("web", &instance, &without, 2);
            if before.contains(&"edge-3") {
                // The agent that stays keeps the target; one replaces edge-3.
                let stayed: Vec<_> = before.iter().filter(|a| **a != "edge-3").collect();
                assert!(stayed.iter().all(|a| after.contains(a)));
                moved += 1;
            } else {
                assert_eq!(
                    before.iter().collect::<std::collections::BTreeSet<_>>(),
                    after.iter().collect(),
                    "a target edge-3 did not probe must not move"
                );
            }
            assert_eq!(
                choose("web", &instance, &all, 2),
                before,
                "stable when it returns"
            );
        }
        // About K/N of the targets (2/5) had edge-3.
        assert!((600..=1_000).contains(&moved), "{moved} moved");
    }

    #[test]
    fn fewer_candidates_than_k_gives_all_of_them() {
        assert_eq!(choose("j", "t", &["a"], 3), ["a"]);
        assert!(choose("j", "t", &[], 2).is_empty());
    }
}
