//! deploy/fleet.yaml against config/ and the declared access table, without AWS: the same queues,
//! DLQs, maxReceiveCount, visibility timeouts, retention and tables; each task role allows what its
//! worker calls (common/src/access.rs) and nothing else; no wildcard anywhere but the one grant AWS
//! cannot scope. The checks are functions returning the problems they find, so the tests below can
//! show that they catch a queue renamed in config/ only and a role that gains a wildcard.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use fleet_common::access;
use fleet_common::config::FleetConfig;
use fleet_e2e::workspace_root;
use serde_json::Value;

fn template() -> Value {
    let text = std::fs::read_to_string(workspace_root().join("deploy/fleet.yaml")).unwrap();
    serde_norway::from_str(&text).expect("deploy/fleet.yaml is YAML with long-form intrinsics")
}

fn config(file: &str) -> FleetConfig {
    let path = workspace_root().join("config").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    FleetConfig::from_toml_with_env(&text, Path::new(&path), Vec::new()).unwrap()
}

fn resources(t: &Value) -> &serde_json::Map<String, Value> {
    t["Resources"].as_object().expect("Resources")
}

fn of_type<'a>(t: &'a Value, kind: &str) -> BTreeMap<&'a str, &'a Value> {
    resources(t)
        .iter()
        .filter(|(_, r)| r["Type"] == kind)
        .map(|(k, r)| (k.as_str(), r))
        .collect()
}

/// The logical id a `{Fn::GetAtt: [Id, Arn]}` or `{Ref: Id}` points at.
fn target(v: &Value) -> Option<String> {
    v.get("Fn::GetAtt")
        .and_then(|a| a[0].as_str())
        .or_else(|| v.get("Ref").and_then(Value::as_str))
        .map(str::to_owned)
}

fn list(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    }
}

/// Queues and tables of the template equal those of the config.
fn check_resources(config: &FleetConfig, t: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let queues = of_type(t, "AWS::SQS::Queue");
    let by_name: BTreeMap<&str, (&str, &Value)> = queues
        .iter()
        .map(|(id, r)| {
            (
                r["Properties"]["QueueName"].as_str().unwrap_or_default(),
                (*id, &r["Properties"]),
            )
        })
        .collect();
    let mut expected_names = BTreeSet::new();
    for (key, q) in &config.queues {
        expected_names.insert(q.name.clone());
        expected_names.insert(q.dlq_name());
        let Some((_, p)) = by_name.get(q.name.as_str()) else {
            problems.push(format!("queue {key}: `{}` is not in the template", q.name));
            continue;
        };
        let num = |v: &Value| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        };
        if num(&p["VisibilityTimeout"]) != Some(q.visibility_timeout_secs.into()) {
            problems.push(format!(
                "queue {key}: VisibilityTimeout {} != visibility_timeout_secs {}",
                p["VisibilityTimeout"], q.visibility_timeout_secs
            ));
        }
        if num(&p["MessageRetentionPeriod"]) != Some(q.retention_secs.into()) {
            problems.push(format!(
                "queue {key}: MessageRetentionPeriod {} != retention_secs {}",
                p["MessageRetentionPeriod"], q.retention_secs
            ));
        }
        if num(&p["RedrivePolicy"]["maxReceiveCount"]) != Some(q.max_receive_count.into()) {
            problems.push(format!(
                "queue {key}: maxReceiveCount {} != max_receive_count {}",
                p["RedrivePolicy"]["maxReceiveCount"], q.max_receive_count
            ));
        }
        if p["KmsMasterKeyId"].is_null() {
            problems.push(format!("queue {key}: no KMS key"));
        }
        let dlq_id = target(&p["RedrivePolicy"]["deadLetterTargetArn"]).unwrap_or_default();
        match queues.get(dlq_id.as_str()).map(|r| &r["Properties"]) {
            Some(d) if d["QueueName"] == q.dlq_name().as_str() => {
                if num(&d["MessageRetentionPeriod"]) != Some(q.dlq_retention_secs.into()) {
                    problems.push(format!(
                        "queue {key}: DLQ retention {} != dlq_retention_secs {}",
                        d["MessageRetentionPeriod"], q.dlq_retention_secs
                    ));
                }
                if d["KmsMasterKeyId"].is_null() {
                    problems.push(format!("queue {key}: DLQ without KMS key"));
                }
            }
            _ => problems.push(format!(
                "queue {key}: its redrive policy does not target a queue named `{}`",
                q.dlq_name()
            )),
        }
    }
    for name in by_name.keys() {
        if !expected_names.contains(*name) {
            problems.push(format!(
                "the template has queue `{name}`, which config/ does not name"
            ));
        }
    }
    let tables = of_type(t, "AWS::DynamoDB::Table");
    let mut seen = BTreeSet::new();
    for (key, c) in &config.tables {
        let found = tables
            .values()
            .map(|r| &r["Properties"])
            .find(|p| p["TableName"] == c.name.as_str());
        let Some(p) = found else {
            problems.push(format!("table {key}: `{}` is not in the template", c.name));
            continue;
        };
        seen.insert(c.name.clone());
        let key_of = |kind: &str| {
            p["KeySchema"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|k| k["KeyType"] == kind)
                .and_then(|k| k["AttributeName"].as_str())
                .map(str::to_owned)
        };
        if key_of("HASH").as_deref() != Some(c.partition_key.as_str()) {
            problems.push(format!(
                "table {key}: partition key {:?} != {}",
                key_of("HASH"),
                c.partition_key
            ));
        }
        if key_of("RANGE") != c.sort_key {
            problems.push(format!(
                "table {key}: sort key {:?} != {:?}",
                key_of("RANGE"),
                c.sort_key
            ));
        }
        let ttl = p["TimeToLiveSpecification"]["AttributeName"]
            .as_str()
            .map(str::to_owned);
        if ttl != c.ttl_attribute {
            problems.push(format!(
                "table {key}: TTL {ttl:?} != ttl_attribute {:?}",
                c.ttl_attribute
            ));
        }
        if p["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] != true
            || p["DeletionProtectionEnabled"] != true
            || p["SSESpecification"]["KMSMasterKeyId"].is_null()
        {
            problems.push(format!(
                "table {key}: needs point-in-time recovery, deletion protection and the KMS key"
            ));
        }
    }
    // Threat D-4: every table has an alarm on its read and write throttling.
    let alarms: Vec<String> = of_type(t, "AWS::CloudWatch::Alarm")
        .values()
        .map(|a| a["Properties"].to_string())
        .collect();
    for id in tables.keys() {
        let table = format!(r#"{{"Ref":"{id}"}}"#);
        let watched = alarms.iter().any(|a| {
            a.contains(&table)
                && a.contains("ReadThrottleEvents")
                && a.contains("WriteThrottleEvents")
        });
        if !watched {
            problems.push(format!("table {id}: no alarm on its throttling"));
        }
    }
    for p in tables.values().map(|r| &r["Properties"]) {
        let name = p["TableName"].as_str().unwrap_or_default();
        if !seen.contains(name) {
            problems.push(format!(
                "the template has table `{name}`, which config/ does not name"
            ));
        }
    }
    problems
}

/// (action, resource logical id) pairs that a policy allows; wildcards reported as problems.
fn allowed(policies: &Value, role: &str, problems: &mut Vec<String>) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for policy in policies.as_array().into_iter().flatten() {
        for s in list(&policy["PolicyDocument"]["Statement"]) {
            if s["Effect"] != "Allow" {
                continue;
            }
            for action in list(&s["Action"]) {
                let action = action.as_str().unwrap_or_default();
                for resource in list(&s["Resource"]) {
                    let id = match resource.as_str() {
                        Some(literal) => literal.to_owned(),
                        None => target(resource).unwrap_or_else(|| resource.to_string()),
                    };
                    let exempt = action == "ecr:GetAuthorizationToken" && id == "*";
                    if !exempt && (action.contains('*') || id.contains('*')) {
                        problems.push(format!("{role}: wildcard grant {action} on {id}"));
                    }
                    out.insert((action.to_owned(), id));
                }
            }
        }
    }
    out
}

/// Each task role allows exactly its declared access; no role has a wildcard.
fn check_roles(config: &FleetConfig, t: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let queues = of_type(t, "AWS::SQS::Queue");
    let queue_id = |name: &str| {
        queues
            .iter()
            .find(|(_, r)| r["Properties"]["QueueName"] == name)
            .map(|(id, _)| (*id).to_owned())
            .unwrap_or_else(|| format!("(no queue {name})"))
    };
    let tables = of_type(t, "AWS::DynamoDB::Table");
    let table_id = |name: &str| {
        tables
            .iter()
            .find(|(_, r)| r["Properties"]["TableName"] == name)
            .map(|(id, _)| (*id).to_owned())
            .unwrap_or_else(|| format!("(no table {name})"))
    };
    let task_definitions = of_type(t, "AWS::ECS::TaskDefinition");
    let roles = of_type(t, "AWS::IAM::Role");
    let mut task_roles = BTreeSet::new();
    for a in access::ROLES {
        let Some(td) = task_definitions.values().find(|td| {
            td["Properties"]["ContainerDefinitions"][0]["Command"]
                == serde_json::json!(["run", "--role", a.role])
        }) else {
            problems.push(format!(
                "{}: no task definition runs `run --role {}`",
                a.role, a.role
            ));
            continue;
        };
        let role_id = target(&td["Properties"]["TaskRoleArn"]).unwrap_or_default();
        task_roles.insert(role_id.clone());
        let Some(role) = roles.get(role_id.as_str()) else {
            problems.push(format!("{}: task role `{role_id}` not found", a.role));
            continue;
        };
        let got = allowed(&role["Properties"]["Policies"], a.role, &mut problems);
        let mut want = BTreeSet::new();
        let consumed = &config.queues[a.consumes];
        for action in access::CONSUMER_SQS_ACTIONS {
            want.insert(((*action).to_owned(), queue_id(&consumed.name)));
        }
        let mut targets = vec![consumed.dlq_name()];
        targets.extend(a.sends_to.iter().map(|k| config.queues[*k].name.clone()));
        for name in targets {
            for action in access::SENDER_SQS_ACTIONS {
                want.insert(((*action).to_owned(), queue_id(&name)));
            }
        }
        for (table, actions) in a.tables {
            for action in *actions {
                want.insert(((*action).to_owned(), table_id(&config.tables[*table].name)));
            }
        }
        for action in access::KMS_ACTIONS {
            want.insert(((*action).to_owned(), "FleetKey".to_owned()));
        }
        for extra in got.difference(&want) {
            problems.push(format!(
                "{}: the task role allows {} on {} which the worker does not call",
                a.role, extra.0, extra.1
            ));
        }
        for missing in want.difference(&got) {
            problems.push(format!(
                "{}: the task role lacks {} on {}",
                a.role, missing.0, missing.1
            ));
        }
    }
    for (id, role) in &roles {
        if !task_roles.contains(*id) {
            allowed(&role["Properties"]["Policies"], id, &mut problems);
        }
    }
    problems
}

#[test]
fn the_template_matches_the_config_and_every_role_is_least_privilege() {
    let t = template();
    let production = config("production.toml");
    let problems: Vec<String> = check_resources(&production, &t)
        .into_iter()
        .chain(check_roles(&production, &t))
        .collect();
    assert!(
        problems.is_empty(),
        "deploy/fleet.yaml disagrees:\n{}",
        problems.join("\n")
    );
}

#[test]
fn local_and_production_configs_describe_the_same_fleet() {
    let local = config("fleet.toml");
    let production = config("production.toml");
    assert_eq!(local.queues, production.queues);
    assert_eq!(local.tables, production.tables);
    let workers = |c: &FleetConfig| serde_json::to_value(&c.workers).unwrap();
    assert_eq!(workers(&local), workers(&production));
    assert!(
        production.aws.sqs_endpoint_url.is_none() && production.aws.dynamodb_endpoint_url.is_none(),
        "production uses the standard AWS chain"
    );
    assert!(
        production.observability.emf,
        "production publishes EMF metrics (the error-rate alarms read them)"
    );
}

#[test]
fn a_queue_renamed_in_config_only_is_caught() {
    let t = template();
    let mut renamed = config("production.toml");
    renamed.queues.get_mut("orders").unwrap().name = "fleet-orders-v2".into();
    let problems = check_resources(&renamed, &t);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("`fleet-orders-v2` is not in the template")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("the template has queue `fleet-orders`")),
        "{problems:?}"
    );
    let mut slower = config("production.toml");
    slower.queues.get_mut("delivery").unwrap().max_receive_count = 9;
    assert!(check_resources(&slower, &t)
        .iter()
        .any(|p| p.contains("maxReceiveCount")));
}

#[test]
fn a_table_without_a_throttling_alarm_is_caught() {
    let config = config("production.toml");
    let mut t = template();
    t["Resources"]
        .as_object_mut()
        .unwrap()
        .remove("CatalogTableThrottleAlarm")
        .expect("the template has the catalog's throttling alarm");
    assert_eq!(
        check_resources(&config, &t),
        vec!["table CatalogTable: no alarm on its throttling".to_owned()]
    );
}

#[test]
fn a_role_that_gains_a_wildcard_is_caught() {
    let production = config("production.toml");
    for (action, resource) in [
        (
            "sqs:*",
            serde_json::json!({"Fn::GetAtt": ["OrdersQueue", "Arn"]}),
        ),
        ("dynamodb:PutItem", serde_json::json!("*")),
        (
            "dynamodb:DeleteItem",
            serde_json::json!({"Fn::GetAtt": ["OrdersTable", "Arn"]}),
        ),
    ] {
        let mut t = template();
        let statements = t["Resources"]["WarehouseTaskRole"]["Properties"]["Policies"][0]
            ["PolicyDocument"]["Statement"]
            .as_array_mut()
            .unwrap();
        statements
            .push(serde_json::json!({"Effect": "Allow", "Action": action, "Resource": resource}));
        let problems = check_roles(&production, &t);
        assert!(
            problems.iter().any(|p| p.starts_with("warehouse:")),
            "{action} on {resource} was not caught: {problems:?}"
        );
    }
    let mut t = template();
    t["Resources"]["ExecutionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
        [2]["Resource"] = serde_json::json!("*");
    assert!(check_roles(&production, &t)
        .iter()
        .any(|p| p.contains("ExecutionRole: wildcard")));
}
