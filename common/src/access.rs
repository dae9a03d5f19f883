//! What each worker role calls on AWS, declared once. `deploy/fleet.yaml` grants each role's task
//! exactly this (tests/e2e/deploy.rs holds the template to it), the workers' sources call exactly
//! this (a test in `workers` derives the calls from the code), and the fleet resolves only these
//! queues at start-up, so a role that starts without a grant fails at once, not on the first
//! message.

/// Every role consumes its queue: long polls, heartbeats and releases, batched deletes, and
/// sends to its DLQ what it cannot process.
pub const CONSUMER_SQS_ACTIONS: &[&str] = &[
    "sqs:ReceiveMessage",
    "sqs:ChangeMessageVisibility",
    "sqs:DeleteMessage",
    "sqs:GetQueueAttributes",
    "sqs:GetQueueUrl",
];

/// What a role does to a queue it forwards to (and to its own DLQ).
pub const SENDER_SQS_ACTIONS: &[&str] = &["sqs:SendMessage", "sqs:GetQueueUrl"];

/// KMS on the fleet's key: reading and writing encrypted SQS messages and DynamoDB items. Only
/// ever through those services: see [`kms_via_services`].
pub const KMS_ACTIONS: &[&str] = &["kms:Decrypt", "kms:GenerateDataKey"];

/// What a queue policy admits only the queue's consumer (and the operator) to do: a work queue's
/// consumer is its worker, a DLQ's is the operator (the `dlq` CLI).
pub const QUEUE_CONSUMER_ACTIONS: &[&str] = &[
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
];

/// One role's access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleAccess {
    /// The worker role.
    pub role: &'static str,
    /// The queue it consumes (logical key); it also sends to that queue's DLQ.
    pub consumes: &'static str,
    /// The queues it forwards to (logical keys).
    pub sends_to: &'static [&'static str],
    /// DynamoDB: (table key, actions).
    pub tables: &'static [(&'static str, &'static [&'static str])],
}

/// The four roles.
pub const ROLES: &[RoleAccess] = &[
    RoleAccess {
        role: "ingestion",
        consumes: "ingest",
        sends_to: &["orders", "delivery"],
        // The edge keeps no record: each stage's conditional write is the idempotency.
        tables: &[],
    },
    RoleAccess {
        role: "orders",
        consumes: "orders",
        sends_to: &["warehouse"],
        tables: &[
            ("catalog", &["dynamodb:BatchGetItem"]),
            ("orders", &["dynamodb:PutItem"]),
        ],
    },
    RoleAccess {
        role: "warehouse",
        consumes: "warehouse",
        sends_to: &["delivery"],
        tables: &[
            ("catalog", &["dynamodb:GetItem", "dynamodb:UpdateItem"]),
            ("orders", &["dynamodb:GetItem", "dynamodb:UpdateItem"]),
        ],
    },
    RoleAccess {
        role: "delivery",
        consumes: "delivery",
        sends_to: &[],
        tables: &[("orders", &["dynamodb:GetItem", "dynamodb:UpdateItem"])],
    },
];

/// What every role's runtime does, whatever its handler does: looks up whether a redrive run is
/// open, then writes the outcome of each redriven message it settles under it, in the redrive
/// ledger (see `fleet_common::redrive_ledger`). (table key, actions).
pub const LEDGER: (&str, &[&str]) = (
    crate::redrive_ledger::TABLE_KEY,
    &["dynamodb:GetItem", "dynamodb:PutItem"],
);

/// What the `dlq` CLI does in the redrive ledger: opens a run, reads what became of it.
pub const OPERATOR_LEDGER: (&str, &[&str]) = (
    crate::redrive_ledger::TABLE_KEY,
    &["dynamodb:PutItem", "dynamodb:Query"],
);

impl RoleAccess {
    /// Every (table key, actions) the role's task calls: its handler's and the runtime's.
    pub fn all_tables(&self) -> Vec<(&'static str, &'static [&'static str])> {
        self.tables.iter().copied().chain([LEDGER]).collect()
    }

    /// Whether the runtime sends to the queue the role consumes: a message over
    /// `max_in_flight_per_group` is sent again to it with a delay. Every role after the edge;
    /// never the edge, whose copy would lose the SenderId that names its upstream.
    pub fn defers_to_own_queue(&self) -> bool {
        self.role != "ingestion"
    }

    /// Every queue (logical key) the role's task sends to besides its DLQ: its handler's
    /// forwards, and its own queue when it defers to it.
    pub fn all_sends(&self) -> Vec<&'static str> {
        let own = self.defers_to_own_queue().then_some(self.consumes);
        self.sends_to.iter().copied().chain(own).collect()
    }
}

/// The access of a role.
pub fn of(role: &str) -> Option<&'static RoleAccess> {
    ROLES.iter().find(|r| r.role == role)
}

/// The queue keys a role touches: the one it consumes and those it forwards to.
pub fn queues_of(role: &str) -> Vec<&'static str> {
    of(role).map_or_else(Vec::new, |r| {
        std::iter::once(r.consumes)
            .chain(r.sends_to.iter().copied())
            .collect()
    })
}

/// The services through which a role may use the fleet's key (`kms:ViaService`, as
/// `<service>.<region>.amazonaws.com`): SQS for its encrypted messages, and DynamoDB when it
/// reads or writes a table (DynamoDB decrypts a table's key with the caller's permission; every
/// role writes the redrive ledger).
pub fn kms_via_services(role: &RoleAccess) -> Vec<&'static str> {
    if role.all_tables().is_empty() {
        vec!["sqs"]
    } else {
        vec!["sqs", "dynamodb"]
    }
}

/// What the operator role (`OperatorRole` in `deploy/fleet.yaml`, assumed by ops to run the `dlq`
/// CLI) may do: exactly what the CLI calls. A test in `dlq-cli` derives the CLI's SQS and
/// CloudWatch calls from its sources and holds them to this; tests/e2e/deploy.rs holds the role
/// and the queue policies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperatorAccess {
    /// On every DLQ: resolve and read its attributes, read (messages held, then released),
    /// delete what was moved, exported or purged, send (an import into a DLQ), and SQS's message
    /// move tasks (redrive without filters).
    pub dlq_actions: &'static [&'static str],
    /// On every work queue: redrive and import send to it; resolving a destination and `list`
    /// (which finds each DLQ's sources from the redrive policies) read its attributes. Nothing
    /// that reads or deletes its messages: `peek --force` or `purge --work-queue` of a work queue
    /// need more than this role grants.
    pub work_queue_actions: &'static [&'static str],
    /// Calls AWS cannot scope to a resource (the policy names `*`): listing the account's queues,
    /// and the age of the oldest message from CloudWatch.
    pub unscoped_actions: &'static [&'static str],
    /// KMS on the fleet's key (messages are SSE-KMS).
    pub kms_actions: &'static [&'static str],
    /// The services through which it may use the key (`kms:ViaService`).
    pub kms_via_services: &'static [&'static str],
}

impl OperatorAccess {
    /// Every SQS and CloudWatch action, whatever the resource (KMS excluded: the CLI never calls
    /// KMS itself, SQS does on its behalf).
    pub fn api_actions(&self) -> std::collections::BTreeSet<&'static str> {
        self.dlq_actions
            .iter()
            .chain(self.work_queue_actions)
            .chain(self.unscoped_actions)
            .copied()
            .collect()
    }
}

/// The `dlq` CLI's access.
pub const OPERATOR: OperatorAccess = OperatorAccess {
    dlq_actions: &[
        "sqs:GetQueueUrl",
        "sqs:GetQueueAttributes",
        "sqs:ReceiveMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:DeleteMessage",
        "sqs:SendMessage",
        "sqs:StartMessageMoveTask",
        "sqs:ListMessageMoveTasks",
        "sqs:CancelMessageMoveTask",
    ],
    work_queue_actions: &[
        "sqs:GetQueueUrl",
        "sqs:GetQueueAttributes",
        "sqs:SendMessage",
    ],
    unscoped_actions: &["sqs:ListQueues", "cloudwatch:GetMetricStatistics"],
    kms_actions: KMS_ACTIONS,
    kms_via_services: &["sqs", "dynamodb"],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_reads_and_moves_dlqs_and_only_sends_to_work_queues() {
        for action in QUEUE_CONSUMER_ACTIONS {
            assert!(OPERATOR.dlq_actions.contains(action), "{action}");
            assert!(!OPERATOR.work_queue_actions.contains(action), "{action}");
        }
        assert!(OPERATOR.work_queue_actions.contains(&"sqs:SendMessage"));
        assert!(!OPERATOR.api_actions().contains("sqs:PurgeQueue"));
        assert!(OPERATOR
            .api_actions()
            .iter()
            .all(|a| !a.contains('*') && (a.starts_with("sqs:") || a.starts_with("cloudwatch:"))));
    }

    #[test]
    fn every_role_writes_the_ledger_so_uses_the_key_through_dynamodb_too() {
        for role in ROLES {
            assert_eq!(kms_via_services(role), ["sqs", "dynamodb"], "{}", role.role);
            assert!(role.all_tables().contains(&LEDGER), "{}", role.role);
        }
        // The edge's handler keeps no record of its own: only the runtime's ledger write.
        assert_eq!(of("ingestion").unwrap().all_tables(), [LEDGER]);
    }

    #[test]
    fn the_ledger_module_calls_exactly_what_each_side_is_granted() {
        let source = include_str!("redrive_ledger.rs");
        let body = |name: &str| {
            let start = source
                .find(&format!("fn {name}("))
                .unwrap_or_else(|| panic!("fn {name} in redrive_ledger.rs"));
            &source[start..start + source[start..].find("\n    }\n").unwrap()]
        };
        let calls = |fns: &[&str]| -> Vec<&'static str> {
            let all = [
                (".put_item()", "dynamodb:PutItem"),
                (".get_item()", "dynamodb:GetItem"),
                (".query()", "dynamodb:Query"),
                (".update_item()", "dynamodb:UpdateItem"),
                (".delete_item()", "dynamodb:DeleteItem"),
                (".scan()", "dynamodb:Scan"),
                (".transact_write_items()", "dynamodb:TransactWriteItems"),
            ];
            let text: String = fns.iter().map(|f| body(f)).collect();
            let mut found: Vec<&str> = all
                .iter()
                .filter(|(needle, _)| text.contains(needle))
                .map(|(_, action)| *action)
                .collect();
            found.sort_unstable();
            found
        };
        let sorted = |actions: &[&'static str]| {
            let mut v = actions.to_vec();
            v.sort_unstable();
            v
        };
        // The workers' side (the runtime calls `record`, which looks the run up).
        assert_eq!(calls(&["is_open", "record"]), sorted(LEDGER.1));
        // The CLI's side.
        assert_eq!(
            calls(&["open_run", "entries", "read"]),
            sorted(OPERATOR_LEDGER.1)
        );
        // Every call of the module is on one side or the other.
        let code = &source[..source.find("#[cfg(test)]").unwrap()];
        assert_eq!(
            code.matches(".send()").count(),
            4,
            "a new call: give it a side"
        );
    }
}
