//! Fair sharing of a task's permits between message groups (tenants) on standard queues: at
//! most `max_in_flight_per_group` messages of one group run at once in a task, so one noisy
//! tenant cannot take every permit while a quiet one waits behind its backlog.
//!
//! A first attempt over its group's cap is deferred by the consumer: sent again to its queue
//! with a short delay (the same body, attributes and group) and then deleted, so the deferral
//! uses none of the message's attempts and cannot push it toward the queue's redrive policy.
//! A retry (second attempt or later) always runs, and so does a message deferred
//! [`MAX_DEFERRALS`] times already (counted in its [`DEFERRALS`] attribute, as each deferral is a
//! new message to SQS): deferral delays a message by seconds, never for ever.
//!
//! The group is what the upstream declares (the edge authenticates the sender, not its tenants):
//! a message without a group is never limited.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

/// The attribute counting how often a message was deferred for its group's cap.
pub const DEFERRALS: &str = "fleet-deferrals";

/// How often a message may be deferred before it runs whatever its group's count (about 30 s of
/// deferral, at one second each).
pub const MAX_DEFERRALS: u32 = 30;

/// How often `attributes` say the message was deferred already.
pub fn deferrals(attributes: &std::collections::BTreeMap<String, String>) -> u32 {
    attributes
        .get(DEFERRALS)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
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
    /// `None` when its group is at the cap and the message may wait (`may_wait`: a first attempt
    /// deferred fewer than [`MAX_DEFERRALS`] times).
    pub fn try_enter(&self, group: Option<&str>, may_wait: bool) -> Option<GroupSlot> {
        let (Some(cap), Some(group)) = (self.cap, group) else {
            return Some(GroupSlot {
                group: None,
                running: Arc::clone(&self.running),
            });
        };
        let mut running = self.running.lock().expect("group counts");
        let count = running.entry(group.to_owned()).or_default();
        if *count >= cap.get() && may_wait {
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
        let a1 = limits.try_enter(Some("noisy"), true).unwrap();
        let _a2 = limits.try_enter(Some("noisy"), true).unwrap();
        assert!(
            limits.try_enter(Some("noisy"), true).is_none(),
            "over the cap"
        );
        let retry = limits.try_enter(Some("noisy"), false);
        assert!(retry.is_some(), "a retry is never deferred");
        assert_eq!(limits.running("noisy"), 3);
        let _quiet = limits.try_enter(Some("quiet"), true).unwrap();
        let _ungrouped: Vec<GroupSlot> = (0..10)
            .map(|_| limits.try_enter(None, true).unwrap())
            .collect();
        drop(retry);
        drop(a1);
        assert_eq!(limits.running("noisy"), 1);
        assert!(
            limits.try_enter(Some("noisy"), true).is_some(),
            "room again"
        );
    }

    #[test]
    fn a_message_deferred_often_enough_runs_whatever_its_group_count() {
        let mut attributes = std::collections::BTreeMap::new();
        assert_eq!(deferrals(&attributes), 0);
        attributes.insert(DEFERRALS.to_owned(), MAX_DEFERRALS.to_string());
        let limits = GroupLimits::new(NonZeroUsize::new(1));
        let _running = limits.try_enter(Some("noisy"), true).unwrap();
        let may_wait = deferrals(&attributes) < MAX_DEFERRALS;
        assert!(limits.try_enter(Some("noisy"), may_wait).is_some());
    }

    #[test]
    fn idle_groups_are_forgotten_and_no_cap_means_no_limit() {
        let limits = GroupLimits::new(NonZeroUsize::new(1));
        for i in 0..1000 {
            drop(
                limits
                    .try_enter(Some(&format!("tenant-{i}")), true)
                    .unwrap(),
            );
        }
        assert_eq!(
            limits.groups(),
            0,
            "the map does not grow with tenants seen"
        );
        let open = GroupLimits::new(None);
        let _held: Vec<GroupSlot> = (0..100)
            .map(|_| open.try_enter(Some("t"), true).unwrap())
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
