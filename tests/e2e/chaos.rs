//! The chaos run, CI-sized (`loadtest::chaos`): 1,000 orders with carrier events through the
//! four roles as separate `worker` processes, while DynamoDB throttles in bursts, forwards, DLQ
//! sends and deletes fail entry by entry, receives fail, calls hang or are slow, responses are
//! lost after the write landed, and a random role is SIGKILLed (and restarted) every 3 s. Then
//! everything that reached a DLQ for a transient reason is redriven and drained without faults,
//! and the audit holds the fleet to its promise: nothing lost, no effect twice, every order's
//! whole record as an undisturbed run leaves it, every dead letter attributed with the right
//! reason.

#![forbid(unsafe_code)]

use std::time::Duration;

use fleet_e2e::{dlq_binary, worker_binary, workspace_root, TestEnv};
use fleet_harness::scenario::{Mix, Scenario};
use loadtest::chaos::{self, Plan, Setup, DEFAULT_FAULTS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_orders_through_faults_and_kills_end_as_an_undisturbed_run_would() {
    let env = TestEnv::new(chaos::tune).await;
    let catalog = env.seed_catalog().await;
    let scenario = Scenario::generate(1_000, Mix::default(), &catalog, 1_000, &env.suffix);
    let setup = Setup {
        worker_bin: worker_binary(),
        dlq_bin: dlq_binary(),
        config_path: "config/fleet.toml".into(),
        workdir: workspace_root(),
        env: env.env_overrides(),
        clients: &env.clients,
        topology: &env.topology,
        tables: env.tables(),
    };
    let plan = Plan {
        faults: DEFAULT_FAULTS.to_owned(),
        kill_every: Duration::from_secs(3),
        phase_timeout: Duration::from_secs(600),
    };
    let report = chaos::run(&setup, &plan, &scenario, &catalog)
        .await
        .unwrap();
    eprintln!("chaos: {}", serde_json::to_string(&report).unwrap());

    // The faults were real.
    assert!(report.kills >= 3, "{} kills", report.kills);
    let injected = |fault: &str| {
        report
            .faults_injected
            .iter()
            .filter(|(k, _)| k.ends_with(fault))
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    for fault in ["throttle", "fail_entries", "lost_response", "error", "slow"] {
        assert!(
            injected(fault) > 0,
            "no {fault} injected: {:?}",
            report.faults_injected
        );
    }
    assert!(report.throttled_runs > 0 && report.retries > 0);

    // The promise.
    assert_eq!(report.audit.lost, 0, "{:?}", report.audit.offenders);
    assert_eq!(
        report.audit.duplicate_effects, 0,
        "{:?}",
        report.audit.offenders
    );
    assert_eq!(report.audit.unexpected_orders, 0);
    assert_eq!(
        report.audit.orders_completed,
        scenario.expected.len() as u64
    );
    assert_eq!(
        report.dead_letter_mismatches, 0,
        "every dead letter attributed with the right reason, nothing else: {:?} vs {:?}",
        report.dead_letters, scenario.expected_dead_letters
    );
    assert!(report.passed(scenario.expected.len() as u64));
}
