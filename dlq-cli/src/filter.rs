//! Which messages a command acts on. Every given criterion must hold (AND); a repeated flag
//! accepts any of its values (OR).

use std::time::Duration;

use clap::Args;
use regex::Regex;
use time::OffsetDateTime;

use fleet_common::attribution::Attribution;

use crate::record::DlqMessage;

/// Filters shared by `peek`, `redrive` and `export`.
#[derive(Debug, Clone, Default, Args)]
pub struct Filter {
    /// Only messages with this attribution reason (repeatable). `none` matches messages that
    /// SQS moved by itself (no attribution).
    #[arg(long = "reason", value_name = "REASON")]
    pub reasons: Vec<String>,
    /// Only messages that this worker role dead-lettered (repeatable).
    #[arg(long = "worker", value_name = "ROLE")]
    pub workers: Vec<String>,
    /// Only messages with this correlation id (repeatable).
    #[arg(long = "correlation-id", value_name = "ID")]
    pub correlation_ids: Vec<String>,
    /// Only messages that first failed longer ago than this (`90s`, `15m`, `2h`, `3d`).
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,
    /// Only messages that first failed more recently than this.
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
    pub newer_than: Option<Duration>,
    /// Only messages whose message attribute NAME has the string VALUE (repeatable, all must hold).
    #[arg(long = "attribute", value_name = "NAME=VALUE", value_parser = parse_attribute)]
    pub attributes: Vec<(String, String)>,
    /// Only messages whose body matches this regular expression.
    #[arg(long, value_name = "REGEX")]
    pub body_match: Option<Regex>,
    /// Only messages dead-lettered at or after this time: RFC 3339 (`2026-11-25T14:00:00Z`, a
    /// release's rollout) or an age (`30m`: in the last 30 minutes).
    #[arg(long, value_name = "TIME", value_parser = parse_since)]
    pub since: Option<Since>,
    /// Only messages dead-lettered by a worker of this build (repeatable; as `--by version`
    /// shows it, or its git revision alone).
    #[arg(long = "version", value_name = "VERSION")]
    pub versions: Vec<String>,
    /// Only messages last moved by this `dlq redrive` run (repeatable).
    #[arg(long = "redrive", value_name = "REDRIVE_ID")]
    pub redrives: Vec<String>,
}

/// `--since`: a point in time, or an age back from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// At or after this time.
    At(OffsetDateTime),
    /// Within this long before now.
    Within(Duration),
}

impl Since {
    fn start(self, now: OffsetDateTime) -> OffsetDateTime {
        match self {
            Self::At(at) => at,
            Self::Within(d) => now - d,
        }
    }
}

fn parse_since(s: &str) -> Result<Since, String> {
    if let Ok(at) = OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(Since::At(at));
    }
    humantime::parse_duration(s)
        .map(Since::Within)
        .map_err(|_| {
            format!("`{s}` is neither an RFC 3339 time (2026-11-25T14:00:00Z) nor an age (30m, 2h)")
        })
}

fn parse_attribute(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=VALUE"))?;
    if name.is_empty() {
        return Err(format!("`{s}` has an empty attribute name"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

impl Filter {
    /// Whether no criterion is given (every message matches).
    pub fn is_empty(&self) -> bool {
        self.reasons.is_empty()
            && self.workers.is_empty()
            && self.correlation_ids.is_empty()
            && self.older_than.is_none()
            && self.newer_than.is_none()
            && self.attributes.is_empty()
            && self.body_match.is_none()
            && self.since.is_none()
            && self.versions.is_empty()
            && self.redrives.is_empty()
    }

    /// Whether `m` passes every criterion at time `now`.
    pub fn matches(&self, m: &DlqMessage, now: OffsetDateTime) -> bool {
        let attribution = m.attribution();
        self.matches_attribution(attribution.as_ref())
            && self.matches_times(m, attribution.as_ref(), now)
            && self.matches_message(m)
    }

    /// `--reason` (`none`: moved by SQS), `--worker`, `--version` (or its git revision).
    fn matches_attribution(&self, attribution: Option<&Attribution>) -> bool {
        let reason = attribution.map_or("none", |a| a.reason.as_str());
        if !self.reasons.is_empty() && !self.reasons.iter().any(|r| r == reason) {
            return false;
        }
        if !self.workers.is_empty()
            && !attribution.is_some_and(|a| self.workers.contains(&a.worker))
        {
            return false;
        }
        if !self.versions.is_empty() {
            let version = attribution.and_then(|a| a.version.as_deref());
            let revision = version.and_then(|v| v.split_once('+')).map(|(_, r)| r);
            if !self
                .versions
                .iter()
                .any(|v| Some(v.as_str()) == version || Some(v.as_str()) == revision)
            {
                return false;
            }
        }
        true
    }

    /// `--older-than`, `--newer-than` (since the first failure, else since SQS took it in) and
    /// `--since` (since it was dead-lettered: the worker's time, else when SQS took it in).
    fn matches_times(
        &self,
        m: &DlqMessage,
        attribution: Option<&Attribution>,
        now: OffsetDateTime,
    ) -> bool {
        if self.older_than.is_some() || self.newer_than.is_some() {
            let Some(at) = attribution
                .map(|a| a.first_failed_at)
                .or_else(|| m.sent_at())
            else {
                return false;
            };
            let age = now - at;
            if self.older_than.is_some_and(|d| age <= d) {
                return false;
            }
            if self.newer_than.is_some_and(|d| age >= d) {
                return false;
            }
        }
        if let Some(since) = self.since {
            let at = attribution
                .map(|a| a.last_failed_at)
                .or_else(|| m.sent_at());
            if at.is_none_or(|at| at < since.start(now)) {
                return false;
            }
        }
        true
    }

    /// `--correlation-id`, `--attribute`, `--body-matches`, `--redrive`.
    fn matches_message(&self, m: &DlqMessage) -> bool {
        if !self.correlation_ids.is_empty()
            && !m
                .correlation_id()
                .is_some_and(|id| self.correlation_ids.contains(&id))
        {
            return false;
        }
        let attribute_differs = |(name, value): (&String, &String)| {
            m.attributes
                .get(name)
                .and_then(|v| v.string_value.as_deref())
                != Some(value.as_str())
        };
        if self
            .attributes
            .iter()
            .map(|(n, v)| (n, v))
            .any(attribute_differs)
        {
            return false;
        }
        if self
            .body_match
            .as_ref()
            .is_some_and(|re| !re.is_match(&m.body))
        {
            return false;
        }
        if !self.redrives.is_empty()
            && !m
                .redrive()
                .and_then(|r| r.id)
                .is_some_and(|id| self.redrives.contains(&id))
        {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::{attribution, message};
    use crate::record::AttributeValue;
    use fleet_common::failure::FailureClass;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-20 12:00 UTC);

    #[test]
    fn no_criterion_matches_everything() {
        let f = Filter::default();
        assert!(f.is_empty());
        assert!(f.matches(&message("m", "x", None), NOW));
    }

    #[test]
    fn reasons_are_alternatives_and_none_means_moved_by_sqs() {
        let f = Filter {
            reasons: vec!["malformed_body".into(), "none".into()],
            ..Filter::default()
        };
        let malformed = message(
            "a",
            "{}",
            Some(&attribution(
                "malformed_body",
                "ingestion",
                FailureClass::Permanent,
            )),
        );
        let conflict = message(
            "b",
            "{}",
            Some(&attribution("conflict", "orders", FailureClass::Permanent)),
        );
        assert!(f.matches(&malformed, NOW));
        assert!(!f.matches(&conflict, NOW));
        assert!(f.matches(&message("c", "{}", None), NOW));
    }

    #[test]
    fn every_kind_of_criterion_must_hold() {
        let a = attribution(
            "dependency_unavailable",
            "orders",
            FailureClass::AttemptsExhausted,
        );
        let mut m = message("a", r#"{"order_id":"o-7"}"#, Some(&a));
        m.attributes
            .insert("fleet-source".into(), AttributeValue::string("storefront"));
        let all = Filter {
            reasons: vec!["dependency_unavailable".into()],
            workers: vec!["orders".into()],
            correlation_ids: vec!["corr-1".into()],
            older_than: Some(Duration::from_secs(3600)),
            newer_than: Some(Duration::from_secs(86_400)),
            attributes: vec![("fleet-source".into(), "storefront".into())],
            body_match: Some(Regex::new("o-7").unwrap()),
            since: Some(Since::Within(Duration::from_secs(86_400))),
            versions: vec!["0.1.0+abc".into()],
            redrives: Vec::new(),
        };
        assert!(all.matches(&m, NOW));
        let wrong = [
            Filter {
                workers: vec!["delivery".into()],
                ..all.clone()
            },
            Filter {
                correlation_ids: vec!["other".into()],
                ..all.clone()
            },
            Filter {
                older_than: Some(Duration::from_secs(3 * 3600)),
                ..all.clone()
            },
            Filter {
                newer_than: Some(Duration::from_secs(60)),
                ..all.clone()
            },
            Filter {
                attributes: vec![("fleet-source".into(), "carrier".into())],
                ..all.clone()
            },
            Filter {
                body_match: Some(Regex::new("o-8").unwrap()),
                ..all.clone()
            },
        ];
        for f in wrong {
            assert!(!f.matches(&m, NOW), "{f:?}");
        }
    }

    #[test]
    fn since_version_and_redrive_select_what_a_release_or_a_redrive_left() {
        // Dead-lettered at 10:16 by build 0.1.0+abc (see `attribution`).
        let a = attribution("malformed_body", "ingestion", FailureClass::Permanent);
        let mut m = message("m", "{}", Some(&a));
        let since = |s: &str| Filter {
            since: Some(parse_since(s).unwrap()),
            ..Filter::default()
        };
        assert!(since("2026-11-20T10:16:00Z").matches(&m, NOW));
        assert!(!since("2026-11-20T10:16:01Z").matches(&m, NOW));
        assert!(since("2h").matches(&m, NOW), "10:16 is within 2 h of 12:00");
        assert!(!since("1h").matches(&m, NOW));
        assert!(parse_since("yesterday").is_err());
        let version = |v: &str| Filter {
            versions: vec![v.into()],
            ..Filter::default()
        };
        assert!(version("0.1.0+abc").matches(&m, NOW));
        assert!(version("abc").matches(&m, NOW), "the revision alone");
        assert!(!version("0.1.0+def").matches(&m, NOW));
        let redrive = Filter {
            redrives: vec!["run-1".into()],
            ..Filter::default()
        };
        assert!(!redrive.matches(&m, NOW), "never redriven");
        m.attributes.insert(
            fleet_common::attribution::REDRIVE.into(),
            AttributeValue::string(r#"{"count":1,"at":"2026-11-20T10:30:00Z","from_queue":"q-dlq","previous_reason":"x","id":"run-1"}"#),
        );
        assert!(redrive.matches(&m, NOW));
    }

    #[test]
    fn attribute_flags_must_be_name_equals_value() {
        assert_eq!(
            parse_attribute("a=b=c").unwrap(),
            ("a".into(), "b=c".into())
        );
        assert!(parse_attribute("novalue").is_err());
        assert!(parse_attribute("=x").is_err());
    }
}
