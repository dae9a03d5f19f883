//! deploy/fleet.yaml against config/ and the declared access table, without AWS: the same queues,
//! DLQs, maxReceiveCount, visibility timeouts, retention and tables; each task role allows what its
//! worker calls and the operator role what the dlq CLI calls (common/src/access.rs) and nothing
//! else; no wildcard anywhere but the grants AWS cannot scope. The resource policies: every queue
//! denies non-TLS access and leaves SendMessage to its intended senders and Receive/Delete/
//! ChangeMessageVisibility to its consumer and the operator; the KMS key is used only through SQS
//! and DynamoDB and nobody has kms:*; only CloudWatch alarms publish to the alarm topic. The
//! checks are functions returning the problems they find, so the tests below can show that they
//! catch a queue renamed in config/ only, a role that gains a wildcard, and weakened policies.

#![forbid(unsafe_code)]

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
    // Every DLQ has an alarm on the messages in it, visible or held: a redrive or an export
    // holds what it reads invisible, and must not quiet the alarm while it runs.
    let queues = of_type(t, "AWS::SQS::Queue");
    for c in config.queues.values() {
        let Some((id, _)) = queues
            .iter()
            .find(|(_, r)| r["Properties"]["QueueName"] == c.dlq_name().as_str())
        else {
            continue;
        };
        let queue = format!(r#"{{"Fn::GetAtt":["{id}","QueueName"]}}"#);
        let watched = alarms.iter().any(|a| {
            a.contains(&queue)
                && a.contains("ApproximateNumberOfMessagesVisible")
                && a.contains("ApproximateNumberOfMessagesNotVisible")
        });
        if !watched {
            problems.push(format!(
                "queue {id}: no alarm on its messages, visible and held"
            ));
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

/// (action, resource logical id) pairs that a policy allows; wildcards reported as problems, but
/// for `ecr:GetAuthorizationToken` and the `unscoped` actions on `*` (AWS cannot scope them).
fn allowed(
    policies: &Value,
    role: &str,
    unscoped: &[&str],
    problems: &mut Vec<String>,
) -> BTreeSet<(String, String)> {
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
                    let exempt = id == "*"
                        && (action == "ecr:GetAuthorizationToken" || unscoped.contains(&action));
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

/// Each task role allows exactly its declared access, the operator role exactly what the dlq CLI
/// calls; no role has a wildcard but the grants AWS cannot scope.
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
        let got = allowed(&role["Properties"]["Policies"], a.role, &[], &mut problems);
        let mut want = BTreeSet::new();
        let consumed = &config.queues[a.consumes];
        for action in access::CONSUMER_SQS_ACTIONS {
            want.insert(((*action).to_owned(), queue_id(&consumed.name)));
        }
        let mut targets = vec![consumed.dlq_name()];
        targets.extend(a.all_sends().iter().map(|k| config.queues[*k].name.clone()));
        for name in targets {
            for action in access::SENDER_SQS_ACTIONS {
                want.insert(((*action).to_owned(), queue_id(&name)));
            }
        }
        for (table, actions) in a.all_tables() {
            for action in actions {
                want.insert(((*action).to_owned(), table_id(&config.tables[table].name)));
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
    problems.extend(check_operator_role(config, t));
    for (id, role) in &roles {
        if !task_roles.contains(*id) && *id != OPERATOR_ROLE {
            allowed(&role["Properties"]["Policies"], id, &[], &mut problems);
        }
    }
    problems
}

/// The logical id of the role ops assume for the dlq CLI.
const OPERATOR_ROLE: &str = "OperatorRole";

/// The parameter naming who may assume it.
const OPERATOR_PRINCIPAL: &str = "OperatorPrincipalArn";

/// The parameter naming the upstream roles that send to the edge queue.
const EDGE_SENDERS: &str = "IngestSenderRoleArns";

/// The operator role allows exactly `access::OPERATOR` (on every DLQ, every work queue, `*` for
/// what AWS cannot scope, the key through SQS) and only `OperatorPrincipalArn` may assume it.
fn check_operator_role(config: &FleetConfig, t: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let roles = of_type(t, "AWS::IAM::Role");
    let Some(role) = roles.get(OPERATOR_ROLE) else {
        return vec![format!(
            "operator: no role `{OPERATOR_ROLE}` in the template"
        )];
    };
    let op = access::OPERATOR;
    let got = allowed(
        &role["Properties"]["Policies"],
        "operator",
        op.unscoped_actions,
        &mut problems,
    );
    let queues = of_type(t, "AWS::SQS::Queue");
    let queue_id = |name: &str| {
        queues
            .iter()
            .find(|(_, r)| r["Properties"]["QueueName"] == name)
            .map(|(id, _)| (*id).to_owned())
            .unwrap_or_else(|| format!("(no queue {name})"))
    };
    let mut want = BTreeSet::new();
    for q in config.queues.values() {
        for action in op.dlq_actions {
            want.insert(((*action).to_owned(), queue_id(&q.dlq_name())));
        }
        for action in op.work_queue_actions {
            want.insert(((*action).to_owned(), queue_id(&q.name)));
        }
    }
    for action in op.unscoped_actions {
        want.insert(((*action).to_owned(), "*".to_owned()));
    }
    for action in op.kms_actions {
        want.insert(((*action).to_owned(), "FleetKey".to_owned()));
    }
    let tables = of_type(t, "AWS::DynamoDB::Table");
    let (ledger, actions) = access::OPERATOR_LEDGER;
    if let Some(c) = config.tables.get(ledger) {
        let id = tables
            .iter()
            .find(|(_, r)| r["Properties"]["TableName"] == c.name.as_str())
            .map_or_else(
                || format!("(no table {})", c.name),
                |(id, _)| (*id).to_owned(),
            );
        for action in actions {
            want.insert(((*action).to_owned(), id.clone()));
        }
    }
    for extra in got.difference(&want) {
        problems.push(format!(
            "operator: the role allows {} on {} which the dlq CLI does not call",
            extra.0, extra.1
        ));
    }
    for missing in want.difference(&got) {
        problems.push(format!(
            "operator: the role lacks {} on {}",
            missing.0, missing.1
        ));
    }
    let trusted = serde_json::json!({"AWS": {"Ref": OPERATOR_PRINCIPAL}});
    for s in list(&role["Properties"]["AssumeRolePolicyDocument"]["Statement"]) {
        if s["Effect"] == "Allow" && s["Principal"] != trusted {
            problems.push(format!(
                "operator: the role can be assumed by {}, not only by {OPERATOR_PRINCIPAL}",
                s["Principal"]
            ));
        }
    }
    problems
}

/// The logical id of each worker role's task role (from the task definition that runs it).
fn task_role_ids(t: &Value) -> BTreeMap<&'static str, String> {
    let task_definitions = of_type(t, "AWS::ECS::TaskDefinition");
    access::ROLES
        .iter()
        .filter_map(|a| {
            task_definitions
                .values()
                .find(|td| {
                    td["Properties"]["ContainerDefinitions"][0]["Command"]
                        == serde_json::json!(["run", "--role", a.role])
                })
                .and_then(|td| target(&td["Properties"]["TaskRoleArn"]))
                .map(|id| (a.role, id))
        })
        .collect()
}

/// Whether an IAM action pattern (`sqs:*`, `kms:GenerateDataKey*`) covers an action; IAM compares
/// actions case-insensitively.
fn covers(pattern: &str, action: &str) -> bool {
    fn glob(p: &[u8], a: &[u8]) -> bool {
        match p.first() {
            None => a.is_empty(),
            Some(&b'*') => (0..=a.len()).any(|i| glob(&p[1..], &a[i..])),
            Some(&b'?') => !a.is_empty() && glob(&p[1..], &a[1..]),
            Some(&c) => a.first() == Some(&c) && glob(&p[1..], &a[1..]),
        }
    }
    glob(
        pattern.to_ascii_lowercase().as_bytes(),
        action.to_ascii_lowercase().as_bytes(),
    )
}

/// The strings of a string-or-list value (intrinsics shown as JSON).
fn strs(v: &Value) -> Vec<String> {
    if v.is_null() {
        return Vec::new();
    }
    list(v)
        .into_iter()
        .map(|s| s.as_str().map_or_else(|| s.to_string(), str::to_owned))
        .collect()
}

/// A statement's principal is everyone (`"*"` or `{AWS: "*"}`).
fn is_everyone(principal: &Value) -> bool {
    principal == "*" || list(&principal["AWS"]).iter().any(|p| *p == "*")
}

/// The principals an ARN condition value names, as logical ids (`{Fn::GetAtt: [Role, Arn]}` is
/// `Role`, `{Ref: Param}` is `Param`), through lists, Fn::Split and Fn::Join; a literal stands
/// for itself.
fn principals(v: &Value) -> BTreeSet<String> {
    fn collect(v: &Value, out: &mut BTreeSet<String>) {
        if let Some(id) = target(v) {
            out.insert(id);
            return;
        }
        match v {
            Value::Array(items) => items.iter().for_each(|i| collect(i, out)),
            Value::Object(m) => {
                match ["Fn::Split", "Fn::Join"]
                    .iter()
                    .find_map(|f| m.get(*f).and_then(Value::as_array))
                {
                    // [delimiter, values]: the delimiter names nobody.
                    Some(args) => args.iter().skip(1).for_each(|a| collect(a, out)),
                    None => {
                        out.insert(v.to_string());
                    }
                }
            }
            Value::String(s) => {
                out.insert(s.clone());
            }
            other => {
                out.insert(other.to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    collect(v, &mut out);
    out
}

/// The policy documents of the resources of a kind that name a resource in `list_key`
/// (`Queues`, `Topics`), by the logical id they name.
fn policies_of<'a>(t: &'a Value, kind: &str, list_key: &str) -> BTreeMap<String, Vec<&'a Value>> {
    let mut out: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for policy in of_type(t, kind).values() {
        for named in list(&policy["Properties"][list_key]) {
            if let Some(id) = target(named) {
                out.entry(id)
                    .or_default()
                    .push(&policy["Properties"]["PolicyDocument"]);
            }
        }
    }
    out
}

/// A statement's resource is the resource `id` (or `*`, which in a resource policy is the same).
fn applies_to(resource: &Value, id: &str) -> bool {
    list(resource)
        .iter()
        .any(|r| *r == "*" || target(r).as_deref() == Some(id))
}

/// Who a resource policy leaves `action` to: the principals exempt from every Deny of everyone
/// that covers the action and whose only condition names them (`ArnNotEquals` or
/// `StringNotEquals` on `aws:PrincipalArn`, nothing else: any further condition narrows the
/// Deny). `None`: no such Deny, the action is left to anyone the account's IAM allows.
fn left_to(statements: &[&Value], id: &str, action: &str) -> Option<BTreeSet<String>> {
    let mut left: Option<BTreeSet<String>> = None;
    for s in statements {
        let denies = s["Effect"] == "Deny"
            && is_everyone(&s["Principal"])
            && applies_to(&s["Resource"], id)
            && strs(&s["Action"]).iter().any(|a| covers(a, action));
        if !denies {
            continue;
        }
        let exempt = match s.get("Condition").and_then(Value::as_object) {
            None => BTreeSet::new(),
            Some(condition) => {
                let only = condition.iter().next().filter(|_| condition.len() == 1);
                let Some((op, keys)) = only else { continue };
                let keys = keys.as_object().filter(|k| k.len() == 1);
                let Some(who) = keys.and_then(|k| k.get("aws:PrincipalArn")) else {
                    continue;
                };
                if op != "ArnNotEquals" && op != "StringNotEquals" {
                    continue;
                }
                principals(who)
            }
        };
        left = Some(match left {
            None => exempt,
            Some(l) => l.intersection(&exempt).cloned().collect(),
        });
    }
    left
}

/// Every queue's policy: only denies; denies every action without TLS; leaves SendMessage to the
/// intended senders (the edge queue: `IngestSenderRoleArns`; a next queue: the roles that forward
/// to it, and its own worker, which defers a message over its group's cap to it; a DLQ: its
/// worker) and the consumer actions to its consumer (a work queue: its worker;
/// a DLQ: nobody else), each with the operator.
fn check_queue_policies(config: &FleetConfig, t: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let task_roles = task_role_ids(t);
    let role_id = |role: &str| {
        task_roles
            .get(role)
            .cloned()
            .unwrap_or_else(|| format!("(no task role for {role})"))
    };
    let edge = access::of("ingestion").map(|a| a.consumes);
    // queue name -> (senders, consumers)
    let mut intended: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for (key, q) in &config.queues {
        let operator = BTreeSet::from([OPERATOR_ROLE.to_owned()]);
        let consumers: BTreeSet<String> = access::ROLES
            .iter()
            .filter(|a| a.consumes == key.as_str())
            .map(|a| role_id(a.role))
            .collect();
        let mut senders: BTreeSet<String> = access::ROLES
            .iter()
            .filter(|a| a.all_sends().contains(&key.as_str()))
            .map(|a| role_id(a.role))
            .collect();
        if edge == Some(key.as_str()) {
            senders.insert(EDGE_SENDERS.to_owned());
        }
        intended.insert(
            q.name.clone(),
            (
                senders.union(&operator).cloned().collect(),
                consumers.union(&operator).cloned().collect(),
            ),
        );
        intended.insert(
            q.dlq_name(),
            (consumers.union(&operator).cloned().collect(), operator),
        );
    }
    let queues = of_type(t, "AWS::SQS::Queue");
    let policies = policies_of(t, "AWS::SQS::QueuePolicy", "Queues");
    for (id, queue) in &queues {
        let name = queue["Properties"]["QueueName"]
            .as_str()
            .unwrap_or_default();
        let Some((senders, consumers)) = intended.get(name) else {
            continue; // check_resources names queues that config/ does not
        };
        let docs = policies.get(*id).map(Vec::as_slice).unwrap_or_default();
        let [doc] = docs else {
            problems.push(format!("{name}: {} queue policies, not one", docs.len()));
            continue;
        };
        let statements = list(&doc["Statement"]);
        for s in &statements {
            if s["Effect"] != "Deny" {
                problems.push(format!(
                    "{name}: statement {} allows (queue policies only deny: access is granted by IAM)",
                    s["Sid"]
                ));
            }
            if s.get("NotAction").is_some() || s.get("NotPrincipal").is_some() {
                problems.push(format!(
                    "{name}: statement {} uses NotAction or NotPrincipal",
                    s["Sid"]
                ));
            }
        }
        let plain_http = statements.iter().any(|s| {
            let only_tls = s["Condition"].as_object().is_some_and(|c| c.len() == 1)
                && s["Condition"]["Bool"]
                    .as_object()
                    .is_some_and(|b| b.len() == 1)
                && [serde_json::json!(false), serde_json::json!("false")]
                    .contains(&s["Condition"]["Bool"]["aws:SecureTransport"]);
            s["Effect"] == "Deny"
                && is_everyone(&s["Principal"])
                && applies_to(&s["Resource"], id)
                && strs(&s["Action"]).iter().any(|a| a == "sqs:*" || a == "*")
                && only_tls
        });
        if !plain_http {
            problems.push(format!(
                "{name}: no Deny of sqs:* to everyone when aws:SecureTransport is false"
            ));
        }
        let expectations = std::iter::once(("sqs:SendMessage", senders)).chain(
            access::QUEUE_CONSUMER_ACTIONS
                .iter()
                .map(|a| (*a, consumers)),
        );
        for (action, want) in expectations {
            match left_to(&statements, id, action) {
                None => problems.push(format!(
                    "{name}: anyone the account allows may {action} (no Deny of everyone else by aws:PrincipalArn)"
                )),
                Some(got) if &got != want => problems.push(format!(
                    "{name}: {action} is left to {got:?}, not {want:?}"
                )),
                Some(_) => {}
            }
        }
    }
    problems
}

/// Actions that use a KMS key (rather than administer it).
const KEY_USE: &[&str] = &[
    "kms:Encrypt",
    "kms:Decrypt",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:GenerateDataKeyPair",
    "kms:GenerateDataKeyPairWithoutPlaintext",
    "kms:GenerateMac",
    "kms:VerifyMac",
    "kms:Sign",
    "kms:Verify",
    "kms:DeriveSharedSecret",
];

/// The services through which the account may use the fleet's key.
const KEY_VIA: &[&str] = &["sqs", "dynamodb"];

/// The services a statement's `kms:ViaService` condition (StringEquals) names, from
/// `{Fn::Sub: "<service>.${AWS::Region}.amazonaws.com"}`; `None` without one, or with any other
/// value.
fn via_services(statement: &Value) -> Option<BTreeSet<String>> {
    let values = &statement["Condition"]["StringEquals"]["kms:ViaService"];
    if values.is_null() {
        return None;
    }
    list(values)
        .into_iter()
        .map(|v| {
            v["Fn::Sub"]
                .as_str()
                .and_then(|s| s.strip_suffix(".${AWS::Region}.amazonaws.com"))
                .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()))
                .map(str::to_owned)
        })
        .collect()
}

/// The key policy: nobody has kms:* (or `*`); the account administers the key; using it
/// (encrypt, decrypt, data keys…) is allowed to the account only through SQS and DynamoDB
/// (kms:ViaService), to CloudWatch Logs only for the fleet's log groups (encryption context), to
/// CloudWatch only for data keys (the alarm topic), to no other service and never to everyone.
/// Each task role and the operator role use it only through the services they need.
fn check_key_policy(t: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for (id, key) in of_type(t, "AWS::KMS::Key") {
        for (i, s) in list(&key["Properties"]["KeyPolicy"]["Statement"])
            .into_iter()
            .enumerate()
        {
            let sid = s["Sid"]
                .as_str()
                .map_or_else(|| format!("#{i}"), str::to_owned);
            if s["Effect"] != "Allow" {
                continue;
            }
            if s.get("NotAction").is_some() || s.get("NotPrincipal").is_some() {
                problems.push(format!("{id} {sid}: NotAction or NotPrincipal"));
            }
            let actions = strs(&s["Action"]);
            if let Some(star) = actions.iter().find(|a| covers(a, "kms:AnyActionAtAll")) {
                problems.push(format!("{id} {sid}: grants {star} (every KMS action)"));
            }
            if is_everyone(&s["Principal"]) {
                problems.push(format!("{id} {sid}: open to every principal"));
                continue;
            }
            let uses: Vec<&str> = KEY_USE
                .iter()
                .copied()
                .filter(|u| actions.iter().any(|a| covers(a, u)))
                .collect();
            if uses.is_empty() {
                continue; // administration
            }
            let service = s["Principal"]["Service"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| {
                    s["Principal"]["Service"]["Fn::Sub"]
                        .as_str()
                        .map(str::to_owned)
                });
            match service.as_deref() {
                None => match via_services(s) {
                    Some(via) if !via.is_empty() && via.iter().all(|v| KEY_VIA.contains(&v.as_str())) => {}
                    via => problems.push(format!(
                        "{id} {sid}: lets {} use the key ({}) through {via:?}, not only through {KEY_VIA:?} (kms:ViaService)",
                        s["Principal"],
                        uses.join(", ")
                    )),
                },
                Some("logs.${AWS::Region}.amazonaws.com") => {
                    let scoped = s["Condition"]
                        .as_object()
                        .into_iter()
                        .flat_map(|c| c.values())
                        .any(|keys| {
                            keys["kms:EncryptionContext:aws:logs:arn"]["Fn::Sub"]
                                .as_str()
                                .is_some_and(|arn| arn.contains(":log-group:/fleet/"))
                        });
                    if !scoped {
                        problems.push(format!(
                            "{id} {sid}: CloudWatch Logs may use the key for any log group"
                        ));
                    }
                }
                Some("cloudwatch.amazonaws.com") => {
                    if let Some(u) = uses
                        .iter()
                        .find(|u| **u != "kms:Decrypt" && !u.starts_with("kms:GenerateDataKey"))
                    {
                        problems.push(format!(
                            "{id} {sid}: CloudWatch may {u} (it needs data keys for the alarm topic only)"
                        ));
                    }
                }
                Some(other) => problems.push(format!("{id} {sid}: {other} may use the key")),
            }
        }
    }
    let roles = of_type(t, "AWS::IAM::Role");
    let mut expected: Vec<(String, String, BTreeSet<String>)> = task_role_ids(t)
        .into_iter()
        .filter_map(|(role, id)| {
            let via = access::kms_via_services(access::of(role)?);
            Some((
                role.to_owned(),
                id,
                via.into_iter().map(str::to_owned).collect(),
            ))
        })
        .collect();
    expected.push((
        "operator".to_owned(),
        OPERATOR_ROLE.to_owned(),
        access::OPERATOR
            .kms_via_services
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
    ));
    for (role, id, want) in expected {
        let Some(r) = roles.get(id.as_str()) else {
            continue; // check_roles names missing roles
        };
        for policy in r["Properties"]["Policies"].as_array().into_iter().flatten() {
            for s in list(&policy["PolicyDocument"]["Statement"]) {
                let kms = strs(&s["Action"]).iter().any(|a| a.starts_with("kms:"));
                if s["Effect"] != "Allow" || !kms {
                    continue;
                }
                let got = via_services(s);
                if got.as_ref() != Some(&want) {
                    problems.push(format!(
                        "{role}: its grant on the key is usable through {got:?}, not only through {want:?} (kms:ViaService)"
                    ));
                }
            }
        }
    }
    problems
}

/// The alarm topic: CloudWatch may publish, only from this account's alarms (aws:SourceAccount
/// and/or aws:SourceArn); everyone else is denied sns:Publish.
fn check_alarm_topic(t: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let alarms = |v: &Value| {
        v["Fn::Sub"].as_str().is_some_and(|arn| {
            arn.contains(":cloudwatch:") && arn.contains(":${AWS::AccountId}:alarm:")
        })
    };
    let account = serde_json::json!({"Ref": "AWS::AccountId"});
    let cloudwatch = |p: &Value| {
        list(&p["Service"]).len() == 1
            && list(&p["Service"])[0] == "cloudwatch.amazonaws.com"
            && p.as_object().is_some_and(|m| m.len() == 1)
    };
    let policies = policies_of(t, "AWS::SNS::TopicPolicy", "Topics");
    for id in of_type(t, "AWS::SNS::Topic").keys() {
        let docs = policies.get(*id).map(Vec::as_slice).unwrap_or_default();
        let [doc] = docs else {
            problems.push(format!("{id}: {} topic policies, not one", docs.len()));
            continue;
        };
        let statements = list(&doc["Statement"]);
        let mut cloudwatch_publishes = false;
        let mut others_denied = false;
        for s in &statements {
            let publish = strs(&s["Action"]).iter().any(|a| covers(a, "sns:Publish"));
            if s["Effect"] == "Allow" {
                if !cloudwatch(&s["Principal"]) {
                    problems.push(format!(
                        "{id}: statement {} allows {} (only CloudWatch may be allowed)",
                        s["Sid"], s["Principal"]
                    ));
                    continue;
                }
                if strs(&s["Action"])
                    .iter()
                    .any(|a| !a.eq_ignore_ascii_case("sns:Publish"))
                {
                    problems.push(format!(
                        "{id}: statement {} allows CloudWatch more than sns:Publish",
                        s["Sid"]
                    ));
                }
                let c = &s["Condition"];
                let source_account = &c["StringEquals"]["aws:SourceAccount"];
                let source_arn = [
                    &c["ArnLike"]["aws:SourceArn"],
                    &c["ArnEquals"]["aws:SourceArn"],
                ]
                .into_iter()
                .find(|v| !v.is_null());
                let account_ok = source_account.is_null() || *source_account == account;
                let arn_ok = match source_arn {
                    Some(v) => alarms(v),
                    None => true,
                };
                if (source_account.is_null() && source_arn.is_none()) || !account_ok || !arn_ok {
                    problems.push(format!(
                        "{id}: statement {} lets CloudWatch publish for any account or alarm (needs aws:SourceAccount of this account and/or aws:SourceArn of its alarms)",
                        s["Sid"]
                    ));
                } else if publish {
                    cloudwatch_publishes = true;
                }
            } else if s["Effect"] == "Deny" && publish && is_everyone(&s["Principal"]) {
                // Denied unless the caller is CloudWatch (and, optionally, unless the request
                // comes from one of the account's alarms): no other condition may narrow it.
                let Some(condition) = s["Condition"].as_object() else {
                    continue; // denies CloudWatch too: caught as "CloudWatch may not publish"
                };
                let exempts_cloudwatch = condition.get("StringNotEquals").is_some_and(|keys| {
                    keys.as_object().is_some_and(|k| k.len() == 1)
                        && keys["aws:PrincipalServiceName"] == "cloudwatch.amazonaws.com"
                });
                let nothing_else = condition.iter().all(|(op, keys)| {
                    op == "StringNotEquals"
                        || ((op == "ArnNotLike" || op == "ArnNotEquals")
                            && keys.as_object().is_some_and(|k| k.len() == 1)
                            && alarms(&keys["aws:SourceArn"]))
                });
                others_denied |= exempts_cloudwatch && nothing_else;
            }
        }
        if !cloudwatch_publishes {
            problems.push(format!(
                "{id}: CloudWatch alarms of this account may not publish"
            ));
        }
        if !others_denied {
            problems.push(format!(
                "{id}: nothing denies sns:Publish to everyone but CloudWatch (aws:PrincipalServiceName)"
            ));
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
fn a_dlq_alarm_that_a_redrive_can_quiet_is_caught() {
    let config = config("production.toml");
    let mut t = template();
    let metrics = t["Resources"]["OrdersDeadLetterAlarm"]["Properties"]["Metrics"]
        .as_array_mut()
        .expect("the orders DLQ alarm sums metrics");
    metrics.retain(|m| m["Id"] != "held");
    assert_eq!(
        check_resources(&config, &t),
        vec!["queue OrdersDeadLetterQueue: no alarm on its messages, visible and held".to_owned()]
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

/// The statement `sid` of a resource's policy: a key's KeyPolicy, a queue or topic policy's
/// PolicyDocument, a role's first inline policy.
fn statement_mut<'a>(t: &'a mut Value, resource: &str, sid: &str) -> &'a mut Value {
    let p = &mut t["Resources"][resource]["Properties"];
    let doc = if p.get("KeyPolicy").is_some() {
        &mut p["KeyPolicy"]
    } else if p.get("PolicyDocument").is_some() {
        &mut p["PolicyDocument"]
    } else {
        &mut p["Policies"][0]["PolicyDocument"]
    };
    doc["Statement"]
        .as_array_mut()
        .expect("a list of statements")
        .iter_mut()
        .find(|s| s["Sid"] == sid)
        .unwrap_or_else(|| panic!("{resource} has no statement {sid}"))
}

fn assert_caught(problems: &[String], expect: &str) {
    assert!(
        problems.iter().any(|p| p.contains(expect)),
        "expected a problem containing {expect:?}, got {problems:#?}"
    );
}

#[test]
fn queue_policies_deny_plain_http_and_admit_only_the_intended_senders_and_consumers() {
    let problems = check_queue_policies(&config("production.toml"), &template());
    assert!(
        problems.is_empty(),
        "queue policies of deploy/fleet.yaml:\n{}",
        problems.join("\n")
    );
}

#[test]
fn a_weakened_queue_policy_is_caught() {
    let production = config("production.toml");
    let check = |t: &Value| check_queue_policies(&production, t);

    // The warehouse may send to the orders queue too.
    let mut t = template();
    statement_mut(&mut t, "OrdersQueuePolicy", "OnlyIntendedSenders")["Condition"]["ArnNotEquals"]
        ["aws:PrincipalArn"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"Fn::GetAtt": ["WarehouseTaskRole", "Arn"]}));
    assert_caught(&check(&t), "fleet-orders: sqs:SendMessage is left to");

    // A DLQ answers plain HTTP.
    let mut t = template();
    t["Resources"]["DeliveryDeadLetterQueuePolicy"]["Properties"]["PolicyDocument"]["Statement"]
        .as_array_mut()
        .unwrap()
        .retain(|s| s["Sid"] != "DenyInsecureTransport");
    assert_caught(
        &check(&t),
        "fleet-delivery-dlq: no Deny of sqs:* to everyone when aws:SecureTransport is false",
    );

    // A further condition narrows the consumers' Deny to some requests.
    let mut t = template();
    statement_mut(&mut t, "WarehouseQueuePolicy", "OnlyItsConsumers")["Condition"]
        ["StringEquals"] = serde_json::json!({"aws:SourceVpc": "vpc-0123"});
    assert_caught(
        &check(&t),
        "fleet-warehouse: anyone the account allows may sqs:ReceiveMessage",
    );

    // A pattern exempts every role of every account.
    let mut t = template();
    statement_mut(&mut t, "IngestDeadLetterQueuePolicy", "OnlyItsConsumers")["Condition"] =
        serde_json::json!({"ArnNotLike": {"aws:PrincipalArn": "arn:aws:iam::*:role/*"}});
    assert_caught(
        &check(&t),
        "fleet-ingest-dlq: anyone the account allows may sqs:DeleteMessage",
    );

    // A worker may read its DLQ.
    let mut t = template();
    statement_mut(&mut t, "OrdersDeadLetterQueuePolicy", "OnlyItsConsumers")["Condition"]
        ["ArnNotEquals"]["aws:PrincipalArn"] = serde_json::json!([
        {"Fn::GetAtt": ["OrdersTaskRole", "Arn"]},
        {"Fn::GetAtt": ["OperatorRole", "Arn"]}
    ]);
    assert_caught(
        &check(&t),
        "fleet-orders-dlq: sqs:ReceiveMessage is left to",
    );

    // The edge queue no longer admits the upstream senders only.
    let mut t = template();
    statement_mut(&mut t, "IngestQueuePolicy", "OnlyIntendedSenders")["Condition"]
        ["ArnNotEquals"]["aws:PrincipalArn"] =
        serde_json::json!({"Fn::GetAtt": ["OperatorRole", "Arn"]});
    assert_caught(&check(&t), "fleet-ingest: sqs:SendMessage is left to");

    // An Allow for everyone.
    let mut t = template();
    t["Resources"]["IngestQueuePolicy"]["Properties"]["PolicyDocument"]["Statement"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "Sid": "Open",
            "Effect": "Allow",
            "Principal": "*",
            "Action": "sqs:SendMessage",
            "Resource": {"Fn::GetAtt": ["IngestQueue", "Arn"]}
        }));
    assert_caught(&check(&t), "fleet-ingest: statement \"Open\" allows");
}

#[test]
fn the_key_is_used_only_through_sqs_and_dynamodb_and_nobody_has_kms_star() {
    let problems = check_key_policy(&template());
    assert!(
        problems.is_empty(),
        "the key policy and the roles' grants on the key:\n{}",
        problems.join("\n")
    );
}

#[test]
fn a_weakened_key_policy_is_caught() {
    // The account root gets kms:* back (so any IAM policy could use the key directly).
    let mut t = template();
    statement_mut(&mut t, "FleetKey", "AccountAdministers")["Action"] = serde_json::json!("kms:*");
    let problems = check_key_policy(&t);
    assert_caught(&problems, "FleetKey AccountAdministers: grants kms:*");
    assert_caught(&problems, "FleetKey AccountAdministers: lets");

    // Use of the key without kms:ViaService.
    let mut t = template();
    statement_mut(&mut t, "FleetKey", "AccountUsesThroughSqs")
        .as_object_mut()
        .unwrap()
        .remove("Condition");
    assert_caught(
        &check_key_policy(&t),
        "FleetKey AccountUsesThroughSqs: lets",
    );

    // Through a service the fleet does not use.
    let mut t = template();
    statement_mut(&mut t, "FleetKey", "AccountUsesThroughDynamoDb")["Condition"]["StringEquals"]
        ["kms:ViaService"] = serde_json::json!({"Fn::Sub": "s3.${AWS::Region}.amazonaws.com"});
    assert_caught(
        &check_key_policy(&t),
        "FleetKey AccountUsesThroughDynamoDb: lets",
    );

    // For every principal.
    let mut t = template();
    statement_mut(&mut t, "FleetKey", "AccountUsesThroughSqs")["Principal"] =
        serde_json::json!({"AWS": "*"});
    assert_caught(
        &check_key_policy(&t),
        "FleetKey AccountUsesThroughSqs: open to every principal",
    );

    // CloudWatch may re-encrypt; Logs may use it for any log group.
    let mut t = template();
    statement_mut(&mut t, "FleetKey", "CloudWatchAlarmsPublish")["Action"] =
        serde_json::json!(["kms:Decrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*"]);
    statement_mut(&mut t, "FleetKey", "CloudWatchLogsEncrypt")
        .as_object_mut()
        .unwrap()
        .remove("Condition");
    let problems = check_key_policy(&t);
    assert_caught(&problems, "CloudWatch may kms:ReEncryptFrom");
    assert_caught(
        &problems,
        "CloudWatch Logs may use the key for any log group",
    );

    // A task role's grant without kms:ViaService, or through more than it needs.
    let mut t = template();
    statement_mut(&mut t, "OrdersTaskRole", "FleetKeyThroughSqsAndDynamoDb")
        .as_object_mut()
        .unwrap()
        .remove("Condition");
    statement_mut(&mut t, "IngestionTaskRole", "FleetKeyThroughSqsAndDynamoDb")["Condition"]
        ["StringEquals"]["kms:ViaService"] = serde_json::json!([
        {"Fn::Sub": "sqs.${AWS::Region}.amazonaws.com"},
        {"Fn::Sub": "dynamodb.${AWS::Region}.amazonaws.com"},
        {"Fn::Sub": "s3.${AWS::Region}.amazonaws.com"}
    ]);
    statement_mut(&mut t, "OperatorRole", "FleetKeyThroughSqsAndDynamoDb")
        .as_object_mut()
        .unwrap()
        .remove("Condition");
    let problems = check_key_policy(&t);
    assert_caught(
        &problems,
        "orders: its grant on the key is usable through None",
    );
    assert_caught(
        &problems,
        "ingestion: its grant on the key is usable through Some(",
    );
    assert_caught(
        &problems,
        "operator: its grant on the key is usable through None",
    );
}

#[test]
fn only_cloudwatch_alarms_of_the_account_publish_to_the_alarm_topic() {
    let problems = check_alarm_topic(&template());
    assert!(
        problems.is_empty(),
        "the alarm topic's policy:\n{}",
        problems.join("\n")
    );
}

#[test]
fn a_weakened_topic_policy_is_caught() {
    let allow = "CloudWatchAlarmsOfThisAccountPublish";

    // Anyone may publish.
    let mut t = template();
    statement_mut(&mut t, "AlarmTopicPolicy", allow)["Principal"] = serde_json::json!({"AWS": "*"});
    assert_caught(
        &check_alarm_topic(&t),
        "AlarmTopic: statement \"CloudWatchAlarmsOfThisAccountPublish\" allows",
    );

    // CloudWatch alarms of any account, or of another one.
    let mut t = template();
    statement_mut(&mut t, "AlarmTopicPolicy", allow)
        .as_object_mut()
        .unwrap()
        .remove("Condition");
    assert_caught(
        &check_alarm_topic(&t),
        "lets CloudWatch publish for any account or alarm",
    );
    let mut t = template();
    statement_mut(&mut t, "AlarmTopicPolicy", allow)["Condition"]["StringEquals"]
        ["aws:SourceAccount"] = serde_json::json!("111122223333");
    assert_caught(
        &check_alarm_topic(&t),
        "lets CloudWatch publish for any account or alarm",
    );

    // Nobody else is denied, or the Deny is narrowed.
    let mut t = template();
    t["Resources"]["AlarmTopicPolicy"]["Properties"]["PolicyDocument"]["Statement"]
        .as_array_mut()
        .unwrap()
        .retain(|s| s["Sid"] != "NobodyElsePublishes");
    assert_caught(
        &check_alarm_topic(&t),
        "AlarmTopic: nothing denies sns:Publish",
    );
    let mut t = template();
    statement_mut(&mut t, "AlarmTopicPolicy", "NobodyElsePublishes")["Condition"]["StringEquals"] =
        serde_json::json!({"aws:SourceVpc": "vpc-0123"});
    assert_caught(
        &check_alarm_topic(&t),
        "AlarmTopic: nothing denies sns:Publish",
    );
}

#[test]
fn an_operator_role_beyond_what_the_dlq_cli_calls_is_caught() {
    let production = config("production.toml");
    for (action, resource, expect) in [
        (
            "sqs:PurgeQueue",
            serde_json::json!({"Fn::GetAtt": ["OrdersDeadLetterQueue", "Arn"]}),
            "operator: the role allows sqs:PurgeQueue on OrdersDeadLetterQueue",
        ),
        (
            "sqs:ReceiveMessage",
            serde_json::json!({"Fn::GetAtt": ["OrdersQueue", "Arn"]}),
            "operator: the role allows sqs:ReceiveMessage on OrdersQueue",
        ),
        (
            "sqs:DeleteMessage",
            serde_json::json!("*"),
            "operator: wildcard grant sqs:DeleteMessage on *",
        ),
        (
            "dynamodb:GetItem",
            serde_json::json!({"Fn::GetAtt": ["OrdersTable", "Arn"]}),
            "operator: the role allows dynamodb:GetItem on OrdersTable",
        ),
    ] {
        let mut t = template();
        t["Resources"]["OperatorRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"Effect": "Allow", "Action": action, "Resource": resource}));
        assert_caught(&check_roles(&production, &t), expect);
    }

    // It loses a call the CLI makes.
    let mut t = template();
    statement_mut(&mut t, "OperatorRole", "ReadMoveAndPurgeTheDlqs")["Action"]
        .as_array_mut()
        .unwrap()
        .retain(|a| a != "sqs:StartMessageMoveTask");
    assert_caught(
        &check_roles(&production, &t),
        "operator: the role lacks sqs:StartMessageMoveTask on IngestDeadLetterQueue",
    );

    // Anyone may assume it.
    let mut t = template();
    t["Resources"]["OperatorRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]
        ["Principal"] = serde_json::json!({"AWS": "*"});
    assert_caught(
        &check_roles(&production, &t),
        "operator: the role can be assumed by",
    );
}
