use super::*;
use crate::config::from_yaml_str;
use std::path::Path;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    input: Labels,
    relabel: Vec<RelabelConfig>,
    #[serde(default)]
    output: Option<Labels>,
    #[serde(default)]
    drop: bool,
}

/// The cases of Prometheus's own relabeling test (model/relabel/relabel_test.go, TestRelabel),
/// written as the YAML a user would write, then a few more for behaviour its code has and
/// that test does not reach.
const CASES: &str = r#"
- name: replace with a group expanded twice
  input: {a: foo, b: bar, c: baz}
  relabel:
    - {source_labels: [a], regex: "f(.*)", target_label: d, separator: ";", replacement: "ch${1}-ch${1}", action: replace}
  output: {a: foo, b: bar, c: baz, d: choo-choo}

- name: replace over two joined sources, then over the rewritten label
  input: {a: foo, b: bar, c: baz}
  relabel:
    - {source_labels: [a, b], regex: "f(.*);(.*)r", target_label: a, separator: ";", replacement: "b${1}${2}m", action: replace}
    - {source_labels: [c, a], regex: "(b).*b(.*)ba(.*)", target_label: d, separator: ";", replacement: "$1$2$2$3", action: replace}
  output: {a: boobam, b: bar, c: baz, d: boooom}

- name: drop stops before a later step
  input: {a: foo}
  relabel:
    - {source_labels: [a], regex: ".*o.*", action: drop}
    - {source_labels: [a], regex: "f(.*)", target_label: d, separator: ";", replacement: "ch$1-ch$1", action: replace}
  drop: true

- name: drop on a match
  input: {a: foo, b: bar}
  relabel:
    - {source_labels: [a], regex: ".*o.*", action: drop}
  drop: true

- name: replace with a group in the middle
  input: {a: abc}
  relabel:
    - {source_labels: [a], regex: ".*(b).*", target_label: d, separator: ";", replacement: "$1", action: replace}
  output: {a: abc, d: b}

- name: drop without a match keeps
  input: {a: foo}
  relabel:
    - {source_labels: [a], regex: "no-match", action: drop}
  output: {a: foo}

- name: the regex must match the whole value
  input: {a: foo}
  relabel:
    - {source_labels: [a], regex: "f|o", action: drop}
  output: {a: foo}

- name: keep without a match drops
  input: {a: foo}
  relabel:
    - {source_labels: [a], regex: "no-match", action: keep}
  drop: true

- name: keep on a match
  input: {a: foo}
  relabel:
    - {source_labels: [a], regex: "f.*", action: keep}
  output: {a: foo}

- name: no replacement without a match
  input: {a: boo}
  relabel:
    - {source_labels: [a], regex: "f", target_label: b, replacement: bar, action: replace}
  output: {a: boo}

- name: hashmod
  input: {a: foo, b: bar, c: baz}
  relabel:
    - {source_labels: [c], target_label: d, separator: ";", action: hashmod, modulus: 1000}
  output: {a: foo, b: bar, c: baz, d: "976"}

- name: hashmod over a value with a newline
  input: {a: "foo\nbar"}
  relabel:
    - {source_labels: [a], target_label: b, separator: ";", action: hashmod, modulus: 1000}
  output: {a: "foo\nbar", b: "734"}

- name: labelmap with a prefix
  input: {a: foo, b1: bar, b2: baz}
  relabel:
    - {regex: "(b.*)", replacement: "bar_${1}", action: labelmap}
  output: {a: foo, b1: bar, b2: baz, bar_b1: bar, bar_b2: baz}

- name: labelmap of meta labels
  input: {a: foo, __meta_my_bar: aaa, __meta_my_baz: bbb, __meta_other: ccc}
  relabel:
    - {regex: "__meta_(my.*)", replacement: "${1}", action: labelmap}
  output: {a: foo, __meta_my_bar: aaa, __meta_my_baz: bbb, __meta_other: ccc, my_bar: aaa, my_baz: bbb}

- name: target label from a group
  input: {a: some-name-value}
  relabel:
    - {source_labels: [a], regex: "some-([^-]+)-([^,]+)", action: replace, replacement: "${2}", target_label: "${1}"}
  output: {a: some-name-value, name: value}

- name: a replacement that expands to nothing writes nothing
  input: {a: some-name-value}
  relabel:
    - {source_labels: [a], regex: "some-([^-]+)-([^,]+)", action: replace, replacement: "${3}", target_label: "${1}"}
  output: {a: some-name-value}

- name: target labels that expand to invalid names are skipped
  input: {a: some-name-0}
  relabel:
    - {source_labels: [a], regex: "some-([^-]+)-([^,]+)", action: replace, replacement: "${1}", target_label: "${3}"}
    - {source_labels: [a], regex: "some-([^-]+)-([^,]+)", action: replace, replacement: "${1}", target_label: "${3}"}
    - {source_labels: [a], regex: "some-([^-]+)(-[^,]+)", action: replace, replacement: "${1}", target_label: "${3}"}
  output: {a: some-name-0}

- name: a real-life use of discovered tags
  input: {__meta_sd_tags: "path:/secret,job:some-job,label:foo=bar"}
  relabel:
    - {source_labels: [__meta_sd_tags], regex: "(?:.+,|^)path:(/[^,]+).*", action: replace, replacement: "${1}", target_label: __metrics_path__}
    - {source_labels: [__meta_sd_tags], regex: "(?:.+,|^)job:([^,]+).*", action: replace, replacement: "${1}", target_label: job}
    - {source_labels: [__meta_sd_tags], regex: "(?:.+,|^)label:([^=]+)=([^,]+).*", action: replace, replacement: "${2}", target_label: "${1}"}
  output: {__meta_sd_tags: "path:/secret,job:some-job,label:foo=bar", __metrics_path__: /secret, job: some-job, foo: bar}

- name: a dropped label written again is seen by a later keep
  input: {__meta_kubernetes_pod_container_port_name: foo, __meta_kubernetes_pod_annotation_XXX_metrics_port: "9091"}
  relabel:
    - {regex: "^__meta_kubernetes_pod_container_port_name$", action: labeldrop}
    - {source_labels: [__meta_kubernetes_pod_annotation_XXX_metrics_port], regex: "(.+)", action: replace, replacement: metrics, target_label: __meta_kubernetes_pod_container_port_name}
    - {source_labels: [__meta_kubernetes_pod_container_port_name], regex: "^metrics$", action: keep}
  output: {__meta_kubernetes_pod_annotation_XXX_metrics_port: "9091", __meta_kubernetes_pod_container_port_name: metrics}

- name: labelkeep
  input: {a: foo, b1: bar, b2: baz}
  relabel:
    - {regex: "(b.*)", action: labelkeep}
  output: {b1: bar, b2: baz}

- name: labeldrop
  input: {a: foo, b1: bar, b2: baz}
  relabel:
    - {regex: "(b.*)", action: labeldrop}
  output: {a: foo}

- name: uppercase and lowercase
  input: {foo: bAr123Foo}
  relabel:
    - {source_labels: [foo], action: uppercase, target_label: foo_uppercase}
    - {source_labels: [foo], action: lowercase, target_label: foo_lowercase}
  output: {foo: bAr123Foo, foo_lowercase: bar123foo, foo_uppercase: BAR123FOO}

- name: keepequal on equal values keeps
  input: {__tmp_port: "1234", __port1: "1234", __port2: "5678"}
  relabel:
    - {source_labels: [__tmp_port], action: keepequal, target_label: __port1}
  output: {__tmp_port: "1234", __port1: "1234", __port2: "5678"}

- name: dropequal on equal values drops
  input: {__tmp_port: "1234", __port1: "1234", __port2: "5678"}
  relabel:
    - {source_labels: [__tmp_port], action: dropequal, target_label: __port1}
  drop: true

- name: dropequal on different values keeps
  input: {__tmp_port: "1234", __port1: "1234", __port2: "5678"}
  relabel:
    - {source_labels: [__tmp_port], action: dropequal, target_label: __port2}
  output: {__tmp_port: "1234", __port1: "1234", __port2: "5678"}

- name: keepequal on different values drops
  input: {__tmp_port: "1234", __port1: "1234", __port2: "5678"}
  relabel:
    - {source_labels: [__tmp_port], action: keepequal, target_label: __port2}
  drop: true

# Beyond Prometheus's table: behaviour of its code that table does not reach.

- name: every field defaulted but the target copies nothing from a missing source
  input: {a: foo}
  relabel:
    - {source_labels: [missing], target_label: b}
  output: {a: foo}

- name: a literal replacement is written even from an empty source
  input: {a: foo}
  relabel:
    - {target_label: team, replacement: shop}
  output: {a: foo, team: shop}

- name: an empty replacement removes the target label
  input: {a: foo, b: bar}
  relabel:
    - {source_labels: [a], target_label: b, replacement: ""}
  output: {a: foo}

- name: the blackbox exporter rewrite
  input: {__address__: "http://127.0.0.1:8080/", job: web}
  relabel:
    - {source_labels: [__address__], target_label: __param_target}
    - {source_labels: [__param_target], target_label: instance}
    - {target_label: __address__, replacement: "127.0.0.1:9115"}
  output: {__address__: "127.0.0.1:9115", __param_target: "http://127.0.0.1:8080/", instance: "http://127.0.0.1:8080/", job: web}

- name: action names are read in any case
  input: {a: foo}
  relabel:
    - {source_labels: [a], regex: "f.*", action: Drop}
  drop: true

- name: lowercase of an empty source removes the target
  input: {a: foo, b: bar}
  relabel:
    - {source_labels: [missing], action: lowercase, target_label: b}
  output: {a: foo}

- name: labelmap does not see the labels it writes
  input: {x_a: "1"}
  relabel:
    - {regex: "x_(.*)", replacement: "x_x_$1", action: labelmap}
  output: {x_a: "1", x_x_a: "1"}

- name: a dollar sign not followed by a name stays as written
  input: {a: foo}
  relabel:
    - {source_labels: [a], target_label: b, replacement: "$$-$-$1"}
  output: {a: foo, b: "$-$-foo"}

- name: hashmod over joined sources
  input: {a: foo, b: bar}
  relabel:
    - {source_labels: [a, b], separator: "/", target_label: shard, action: hashmod, modulus: 7}
  output: {a: foo, b: bar, shard: "<hashmod foo/bar 7>"}
"#;

/// MD5 of `value`, last 8 bytes big-endian, modulo `modulus`: Prometheus's hashmod,
/// spelled out apart from the code under test.
fn hashmod(value: &str, modulus: u64) -> String {
    let digest = md5::compute(value.as_bytes());
    let tail = digest.0[8..]
        .iter()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    (tail % modulus).to_string()
}

#[test]
fn prometheus_relabel_cases() {
    let cases: Vec<Case> = from_yaml_str(Path::new("cases.yml"), CASES).expect("cases parse");
    assert_eq!(cases.len(), 35, "every case parsed");
    for case in cases {
        let got = apply(&case.relabel, &case.input);
        if case.drop {
            assert_eq!(got, None, "{}: expected the label set dropped", case.name);
            continue;
        }
        let mut want = case
            .output
            .unwrap_or_else(|| panic!("{}: give output or drop", case.name));
        for v in want.values_mut() {
            if let Some(spec) = v
                .strip_prefix("<hashmod ")
                .and_then(|s| s.strip_suffix('>'))
            {
                let (value, modulus) = spec.rsplit_once(' ').unwrap();
                *v = hashmod(value, modulus.parse().unwrap());
            }
        }
        assert_eq!(got, Some(want), "{}", case.name);
    }
}

#[test]
fn hashmod_matches_the_known_buckets() {
    assert_eq!(hashmod("baz", 1000), "976");
    assert_eq!(hashmod("foo\nbar", 1000), "734");
}

fn parse(yaml: &str) -> Result<RelabelConfig, crate::config::ConfigError> {
    from_yaml_str(Path::new("r.yml"), yaml)
}

/// Prometheus's TestRelabelValidate and the rest of its load-time checks: the message each
/// config gets (a part of it), or `None` when it is accepted.
#[test]
fn validation_as_prometheus() {
    let cases: &[(&str, Option<&str>)] = &[
        ("{action: ''}", Some("unknown relabel action \"\"")),
        (
            "{action: rewrite}",
            Some("unknown relabel action \"rewrite\""),
        ),
        ("{action: replace}", Some("requires 'target_label' value")),
        ("{action: lowercase}", Some("requires 'target_label' value")),
        ("{action: uppercase}", Some("requires 'target_label' value")),
        ("{action: keepequal}", Some("requires 'target_label' value")),
        ("{action: dropequal}", Some("requires 'target_label' value")),
        (
            "{action: hashmod, target_label: x}",
            Some("requires non-zero modulus"),
        ),
        (
            "{action: hashmod, modulus: 2}",
            Some("requires 'target_label' value"),
        ),
        (
            "{action: hashmod, modulus: 2, target_label: x-y}",
            Some("\"x-y\" is invalid 'target_label' for hashmod action"),
        ),
        (
            "{action: lowercase, target_label: '${3}'}",
            Some("\"${3}\" is invalid 'target_label'"),
        ),
        (
            "{source_labels: [a], regex: 'some-([^-]+)-([^,]+)', action: replace, replacement: '${1}', target_label: '${3}'}",
            None,
        ),
        (
            "{source_labels: [a], regex: 'some-([^-]+)-([^,]+)', action: replace, replacement: '${1}', target_label: '0${3}'}",
            Some("\"0${3}\" is invalid 'target_label'"),
        ),
        (
            "{source_labels: [a], regex: 'some-([^-]+)-([^,]+)', action: replace, replacement: '${1}', target_label: '-${3}'}",
            Some("\"-${3}\" is invalid 'target_label' for replace action"),
        ),
        (
            "{action: replace, target_label: 'a-b'}",
            Some("\"a-b\" is invalid 'target_label' for replace action"),
        ),
        (
            "{action: lowercase, target_label: a, replacement: x}",
            Some("'replacement' can not be set for lowercase action"),
        ),
        (
            "{action: keepequal, target_label: a, regex: 'x'}",
            Some("requires only 'source_labels' and `target_label`"),
        ),
        (
            "{action: dropequal, target_label: a, separator: ','}",
            Some("requires only 'source_labels' and `target_label`"),
        ),
        (
            "{action: labelmap, regex: '(.*)', replacement: 'a-$1'}",
            Some("\"a-$1\" is invalid 'replacement' for labelmap action"),
        ),
        (
            "{action: labeldrop, regex: a, source_labels: [b]}",
            Some("labeldrop action requires only 'regex'"),
        ),
        (
            "{action: labelkeep, regex: a, target_label: b}",
            Some("labelkeep action requires only 'regex'"),
        ),
        (
            "{action: labelkeep, regex: a, replacement: b}",
            Some("labelkeep action requires only 'regex'"),
        ),
        ("{action: labeldrop, regex: a}", None),
        (
            "{source_labels: [a], regex: '(unclosed', target_label: b}",
            Some("invalid regex \"(unclosed\""),
        ),
        (
            "{source_labels: ['not-a-label'], target_label: b}",
            Some("\"not-a-label\" is not a valid label name"),
        ),
        ("{target_label: b, modulo: 2}", Some("modulo")),
        (
            "{action: KeepEqual, source_labels: [a], target_label: b}",
            None,
        ),
    ];
    for (yaml, want) in cases {
        match (parse(yaml), want) {
            (Ok(_), None) => {}
            (Ok(c), Some(w)) => panic!("{yaml}: accepted as {c:?}, expected an error with {w:?}"),
            (Err(e), None) => panic!("{yaml}: refused: {e}"),
            (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{yaml}: {e} lacks {w:?}"),
        }
    }
}

#[test]
fn defaults_as_prometheus() {
    let c = parse("{target_label: x}").unwrap();
    assert_eq!(c.action, RelabelAction::Replace);
    assert_eq!(c.separator, ";");
    assert_eq!(c.regex.as_str(), "(.*)");
    assert!(c.regex.is_default());
    assert_eq!(c.replacement, "$1");
    assert_eq!(c.modulus, 0);
    // The regex is anchored at both ends.
    let c = parse("{source_labels: [a], regex: 'b', action: keep}").unwrap();
    assert!(c.regex.is_match("b"));
    assert!(!c.regex.is_match("abc"));
}

/// Prometheus's TestTargetLabelValidity.
#[test]
fn target_label_templates() {
    let cases = [
        ("-label", false),
        ("label", true),
        ("label${1}", true),
        ("${1}label", true),
        ("${1}", true),
        ("${", false),
        ("$", false),
        ("${}", false),
        ("foo${", false),
        ("$1", true),
        ("asd$2asd", true),
        ("-foo${1}bar-", false),
        ("_${1}_", true),
        ("foo${bar}foo", true),
    ];
    for (template, valid) in cases {
        assert_eq!(is_valid_label_template(template), valid, "{template:?}");
    }
}

#[test]
fn round_trips_through_yaml_form() {
    let c = parse("{source_labels: [a, b], regex: 'x(.*)', target_label: y, replacement: 'z$1'}")
        .unwrap();
    let json = serde_json::to_string(&c).unwrap();
    let back: RelabelConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);
    let d = parse("{target_label: x}").unwrap();
    let json = serde_json::to_string(&d).unwrap();
    assert!(!json.contains("regex"), "{json}");
}
