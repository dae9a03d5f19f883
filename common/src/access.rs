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

/// KMS on the fleet's key: reading and writing encrypted SQS messages.
pub const KMS_ACTIONS: &[&str] = &["kms:Decrypt", "kms:GenerateDataKey"];

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
