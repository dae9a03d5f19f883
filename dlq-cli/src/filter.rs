//! Which messages a command acts on. Every given criterion must hold (AND); a repeated flag
//! accepts any of its values (OR).

use std::time::Duration;

use clap::Args;
use regex::Regex;
use time::OffsetDateTime;

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
    }

    /// Whether `m` passes every criterion at time `now`.
    pub fn matches(&self, m: &DlqMessage, now: OffsetDateTime) -> bool {
        let attribution = m.attribution();
        if !self.reasons.is_empty() {
            let reason = attribution.as_ref().map_or("none", |a| a.reason.as_str());
            if !self.reasons.iter().any(|r| r == reason) {
                return false;
            }
        }
        if !self.workers.is_empty() {
            let Some(a) = &attribution else { return false };
            if !self.workers.contains(&a.worker) {
                return false;
            }
        }
        if !self.correlation_ids.is_empty() {
            let Some(id) = m.correlation_id() else {
                return false;
            };
            if !self.correlation_ids.contains(&id) {
                return false;
            }
        }
        if self.older_than.is_some() || self.newer_than.is_some() {
            let Some(at) = attribution
                .as_ref()
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
        for (name, value) in &self.attributes {
            if m.attributes
                .get(name)
                .and_then(|v| v.string_value.as_deref())
                != Some(value.as_str())
            {
                return false;
            }
        }
        if let Some(re) = &self.body_match {
            if !re.is_match(&m.body) {
                return false;
            }
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
    fn attribute_flags_must_be_name_equals_value() {
        assert_eq!(
            parse_attribute("a=b=c").unwrap(),
            ("a".into(), "b=c".into())
        );
        assert!(parse_attribute("novalue").is_err());
        assert!(parse_attribute("=x").is_err());
    }
}
