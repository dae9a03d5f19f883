//! Fair sharing of a task's permits between message groups (tenants) on standard queues: at
//! most `max_in_flight_per_group` messages of one group run at once in a task, so one noisy
//! tenant cannot take every permit while a quiet one waits behind its backlog.
//!
//! A message over its group's cap, first attempt or retry, is deferred by the consumer: sent
//! again to its queue with a delay (the same body, attributes and group) and then deleted. The
//! attempts it had used travel with it ([`ATTEMPTS`]), because the copy is a new message to SQS
//! with a receive count of its own; so a deferral uses no attempt, takes none away, and cannot
//! push the message toward the queue's redrive policy. The delay doubles with each deferral of
//! the same message ([`DEFERRALS`]), from 1 s up to a minute, so a tenant that keeps its cap
//! busy waits for its own messages without a receive loop that costs requests every second; and
//! a message deferred [`STARVED_AFTER`] times may take one slot above the cap (one per group and
//! task), so that a group's long-deferred messages keep moving while fresh ones arrive.
//!
//! The group is what the upstream declares (the edge authenticates the sender, not its tenants):
//! a message without a group is never limited. The cap is refused at the edge (a copy would lose
//! the SenderId that names its upstream), and the edge ignores both counters.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use aws_sdk_sqs::types::MessageAttributeValue;

/// The attribute counting how often a message was deferred for its group's cap.
pub const DEFERRALS: &str = "fleet-deferrals";

/// The attribute carrying the attempts a deferred message had used before its deferral.
pub const ATTEMPTS: &str = "fleet-attempts";

/// The longest a deferral waits (SQS allows up to 900 s).
pub const MAX_DEFER_SECS: i32 = 60;

/// Deferrals after which a message may take one slot above its group's cap (1 + 2 + 4 + 8 s of
/// waiting).
pub const STARVED_AFTER: u32 = 4;

/// The most a counter attribute is believed (an upstream may set anything).
const MAX_COUNTER: u32 = 1000;

/// A counter attribute (`DEFERRALS`, `ATTEMPTS`) of a message, as the fleet wrote it: 0 when
/// absent or not a number, and never more than 1000.
pub fn counter(attributes: &HashMap<String, MessageAttributeValue>, name: &str) -> u32 {
    attributes
        .get(name)
        .and_then(|v| v.string_value())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0)
        .min(MAX_COUNTER)
}

/// The delay of a message deferred `deferrals` times before: 1 s, then doubling, at most
/// [`MAX_DEFER_SECS`].
pub fn defer_delay(deferrals: u32) -> i32 {
    1_i32
        .checked_shl(deferrals.min(30))
        .unwrap_or(MAX_DEFER_SECS)
        .min(MAX_DEFER_SECS)
}

/// Per-group counts of running messages, under a cap.
#[derive(Debug, Clone)]
pub struct GroupLimits {
    cap: Option<NonZeroUsize>,
    running: Arc<Mutex<HashMap<String, usize>>>,
}

/// A running message's place in its group's count; the count drops when this is dropped.
#[derive(Debug)]
pub struct GroupSlot {
    group: Option<String>,
    running: Arc<Mutex<HashMap<String, usize>>>,
}

impl GroupLimits {
    /// At most `cap` running messages per group; `None`: no cap.
    pub fn new(cap: Option<NonZeroUsize>) -> Self {
        Self {
            cap,
            running: Arc::default(),
        }
    }

    /// A slot for a message of `group` (`None`: a message without a group, never limited), or
    /// `None` when its group is at the cap. A message deferred `deferrals` ≥ [`STARVED_AFTER`]
    /// times may take one slot above it.
    pub fn try_enter(&self, group: Option<&str>, deferrals: u32) -> Option<GroupSlot> {
        let (Some(cap), Some(group)) = (self.cap, group) else {
            return Some(GroupSlot {
                group: None,
                running: Arc::clone(&self.running),
            });
        };
        let mut running = self.running.lock().expect("group counts");
        let count = running.entry(group.to_owned()).or_default();
        let room = cap.get() + usize::from(deferrals >= STARVED_AFTER);
        if *count >= room {
            if *count == 0 {
                running.remove(group);
            }
            return None;
        }
        *count += 1;
        Some(GroupSlot {
            group: Some(group.to_owned()),
            running: Arc::clone(&self.running),
        })
    }

    /// Messages of `group` running now.
    pub fn running(&self, group: &str) -> usize {
        self.running
            .lock()
            .expect("group counts")
            .get(group)
            .copied()
            .unwrap_or(0)
    }

    /// Groups with a message running now (the map never holds idle groups).
    pub fn groups(&self) -> usize {
        self.running.lock().expect("group counts").len()
    }
}

impl Drop for GroupSlot {
    fn drop(&mut self) {
        let Some(group) = &self.group else { return };
        let mut running = self.running.lock().expect("group counts");
        if let Some(count) = running.get_mut(group) {
            *count -= 1;
            if *count == 0 {
                running.remove(group);
            }
        }
    }
}

/// The group id a message sent by the fleet carries: on a FIFO queue always one (the incoming
/// message's, else `default`); on a standard queue the incoming message's when it has one (SQS
/// fair queues share a standard queue's throughput between groups) and none otherwise.
pub fn carried_group_id(target_fifo: bool, group: Option<&str>) -> Option<String> {
    match (target_fifo, group) {
        (_, Some(g)) => Some(g.to_owned()),
        (true, None) => Some("default".to_owned()),
        (false, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_noisy_group_gets_its_cap_and_a_quiet_one_still_gets_in() {
        let limits = GroupLimits::new(NonZeroUsize::new(2));
        let a1 = limits.try_enter(Some("noisy"), 0).unwrap();
        let _a2 = limits.try_enter(Some("noisy"), 0).unwrap();
        assert!(limits.try_enter(Some("noisy"), 0).is_none(), "over the cap");
        assert_eq!(limits.running("noisy"), 2);
        let _quiet = limits.try_enter(Some("quiet"), 0).unwrap();
        let _ungrouped: Vec<GroupSlot> = (0..10)
            .map(|_| limits.try_enter(None, 0).unwrap())
            .collect();
        // A message deferred often enough takes one slot above the cap, and only one.
        let starved = limits.try_enter(Some("noisy"), STARVED_AFTER);
        assert!(starved.is_some(), "a starved message gets in");
        assert!(
            limits.try_enter(Some("noisy"), STARVED_AFTER).is_none(),
            "one above, no more"
        );
        drop(starved);
        drop(a1);
        assert_eq!(limits.running("noisy"), 1);
        assert!(limits.try_enter(Some("noisy"), 0).is_some(), "room again");
    }

    #[test]
    fn a_deferral_waits_longer_each_time_up_to_what_sqs_allows_and_counters_are_bounded() {
        let delays: Vec<i32> = (0..12).map(defer_delay).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60, 60]);
        assert_eq!(defer_delay(u32::MAX), MAX_DEFER_SECS);
        let value = |v: &str| {
            aws_sdk_sqs::types::MessageAttributeValue::builder()
                .data_type("Number")
                .string_value(v)
                .build()
                .unwrap()
        };
        let mut attributes = std::collections::HashMap::new();
        assert_eq!(counter(&attributes, ATTEMPTS), 0);
        attributes.insert(ATTEMPTS.to_owned(), value("3"));
        attributes.insert(DEFERRALS.to_owned(), value("99999999"));
        assert_eq!(counter(&attributes, ATTEMPTS), 3);
        assert_eq!(
            counter(&attributes, DEFERRALS),
            1000,
            "a forged count is bounded"
        );
        attributes.insert(ATTEMPTS.to_owned(), value("-1"));
        assert_eq!(counter(&attributes, ATTEMPTS), 0);
    }

    #[test]
    fn idle_groups_are_forgotten_and_no_cap_means_no_limit() {
        let limits = GroupLimits::new(NonZeroUsize::new(1));
        for i in 0..1000 {
            drop(limits.try_enter(Some(&format!("tenant-{i}")), 0).unwrap());
        }
        assert_eq!(
            limits.groups(),
            0,
            "the map does not grow with tenants seen"
        );
        let open = GroupLimits::new(None);
        let _held: Vec<GroupSlot> = (0..100)
            .map(|_| open.try_enter(Some("t"), 0).unwrap())
            .collect();
    }

    #[test]
    fn group_ids_are_carried_on_standard_queues_and_defaulted_on_fifo() {
        assert_eq!(carried_group_id(false, Some("t-1")).as_deref(), Some("t-1"));
        assert_eq!(carried_group_id(false, None), None);
        assert_eq!(carried_group_id(true, None).as_deref(), Some("default"));
        assert_eq!(carried_group_id(true, Some("o-7")).as_deref(), Some("o-7"));
    }
}
