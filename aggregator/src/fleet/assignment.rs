//! An agent's assignment on the wire: planned and encoded by the hub
//! ([`sonde_hub::assignment`]); the aggregator sends it.

pub use sonde_hub::assignment::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::Target;
    use sonde_proto::pb::{self, AggregatorMessage, aggregator_message};

    #[test]
    fn the_planner_sends_each_module_once() {
        let config = crate::config::AggregatorConfig::from_file(
            std::path::Path::new("t.yml"),
            sonde_proto::config::from_yaml_str(
                std::path::Path::new("t.yml"),
                r#"
modules:
  tcp: {prober: tcp}
  http_2xx: {prober: http}
jobs:
  - {job_name: a, module: tcp, static_configs: [{targets: ["127.0.0.1:1", "127.0.0.1:2"]}]}
  - {job_name: b, module: tcp, static_configs: [{targets: ["127.0.0.1:3"]}]}
  - {job_name: c, module: http_2xx, static_configs: [{targets: ["http://127.0.0.1/"]}]}
"#,
            )
            .unwrap(),
        )
        .unwrap();
        let planner = Planner::new(&config.jobs);
        let target = |job: &str, instance: &str| Target {
            job: job.into(),
            instance: instance.into(),
            probe_target: None,
            labels: Default::default(),
        };
        let relabeled = Target {
            probe_target: Some("127.0.0.1:7".into()),
            ..target("a", "db-primary")
        };
        let targets = [
            target("a", "127.0.0.1:1"),
            target("a", "127.0.0.1:2"),
            relabeled,
            target("b", "127.0.0.1:3"),
            target("c", "http://127.0.0.1/"),
        ];
        let plan = planner.plan(targets.iter().map(|t| (planner.job(&t.job).unwrap(), t)));
        let names: Vec<_> = plan.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["tcp", "http_2xx"]);
        let modules: Vec<_> = plan.checks.iter().map(|c| c.module).collect();
        assert_eq!(modules, [0, 0, 0, 0, 1]);
        let probed: Vec<(&str, &str)> = plan
            .checks
            .iter()
            .map(|c| (c.instance.as_str(), c.target.as_str()))
            .collect();
        assert_eq!(
            probed,
            [
                ("127.0.0.1:1", ""),
                ("127.0.0.1:2", ""),
                ("db-primary", "127.0.0.1:7"),
                ("127.0.0.1:3", ""),
                ("http://127.0.0.1/", "")
            ]
        );
        let module: sonde_proto::config::Module =
            serde_json::from_str(&plan.modules[1].json).unwrap();
        assert_eq!(module.prober, sonde_proto::config::Prober::Http);
    }

    struct Discard;

    impl crate::hub::Output for Discard {
        fn commit(
            &self,
            _: &crate::series::Samples,
            _: &crate::hub::Durable,
        ) -> Result<(), crate::storage::StoreError> {
            Ok(())
        }
    }

    #[test]
    fn the_hub_keeps_the_report_on_the_assignment_it_sent() {
        let path = std::path::Path::new("t.yml");
        let config = crate::config::AggregatorConfig::from_file(
            path,
            sonde_proto::config::from_yaml_str(
                path,
                "modules: {tcp: {prober: tcp}}\njobs: [{job_name: a, module: tcp, static_configs: [{targets: [\"127.0.0.1:1\"]}]}]\n",
            )
            .unwrap(),
        )
        .unwrap();
        let hub =
            crate::hub::Hub::new(std::sync::Arc::new(config), std::sync::Arc::new(Discard), 0);
        let (tx, mut rx) = tokio::sync::mpsc::channel(AGENT_CHANNEL);
        let hello = pb::Hello {
            protocol_version: sonde_proto::PROTOCOL_VERSION,
            agent_id: "edge".into(),
            ..Default::default()
        };
        hub.connect(&hello, Default::default(), None, tx, 0)
            .wait()
            .expect("connect");
        let Ok(AggregatorMessage {
            msg: Some(aggregator_message::Msg::Assignment(sent)),
        }) = rx.try_recv().unwrap()
        else {
            panic!("no assignment sent");
        };
        let status = || {
            hub.snapshot_blocking().agents["edge"]
                .assignment_status
                .clone()
        };
        assert_eq!(
            status(),
            AssignmentStatus::Sent {
                generation: sent.generation,
                checks: 1
            }
        );
        let report = |generation: u64, applied: bool| pb::AssignmentReport {
            generation,
            applied,
            error: if applied {
                String::new()
            } else {
                "too big".into()
            },
            checks: u64::from(applied),
            refused: vec![],
        };
        // A report on another generation than the one sent changes nothing.
        hub.assignment_report("edge", &report(sent.generation + 5, true));
        assert!(matches!(status(), AssignmentStatus::Sent { .. }));
        hub.assignment_report("edge", &report(sent.generation, false));
        assert_eq!(
            status().text(),
            format!("assignment {} refused: too big", sent.generation)
        );
        // An unknown agent's report is dropped.
        hub.assignment_report("nobody", &report(1, true));
        assert!(!hub.snapshot_blocking().agents.contains_key("nobody"));
    }
}
