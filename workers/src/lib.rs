//! The four workers of the fleet and what runs them.
//!
//! - [`ingestion`]: the untrusted edge; validates, deduplicates, routes.
//! - [`orders`]: checks products and prices, records the order.
//! - [`warehouse`]: reserves stock, substitutes or removes lines, records the packing.
//! - [`delivery`]: applies carrier status events as a state machine that never moves backwards.
//!
//! [`fleet`] runs any of them in one process. The scenario generator, its audit and the demo live
//! in `fleet-harness` (harness/), with the other tooling of tests and measurements.

#![forbid(unsafe_code)]

pub mod catalog;
pub mod delivery;
pub mod fleet;
pub mod ingestion;
pub mod orders;
pub mod store;
pub mod warehouse;

#[cfg(test)]
mod access_matches_the_code {
    //! Derives each handler's AWS calls from its source and holds them to the declared table in
    //! `fleet_common::access`, which `deploy/fleet.yaml` is held to in turn.

    use std::collections::BTreeSet;

    use fleet_common::access;
    use regex::Regex;

    const SOURCES: &[(&str, &str)] = &[
        ("ingestion", include_str!("ingestion.rs")),
        ("orders", include_str!("orders.rs")),
        ("warehouse", include_str!("warehouse.rs")),
        ("delivery", include_str!("delivery.rs")),
    ];

    fn action(op: &str) -> String {
        let camel: String = op
            .split('_')
            .map(|w| w[..1].to_uppercase() + &w[1..])
            .collect();
        format!("dynamodb:{camel}")
    }

    /// (table key, action) pairs: an SDK call, or a part of a transaction, followed by the table
    /// it names.
    fn table_calls(source: &str) -> BTreeSet<(String, String)> {
        let call = Regex::new(r"\.(put_item|get_item|update_item|delete_item|batch_get_item|batch_write_item|query|scan)\(\)(?s:.){0,300}?tables\.(\w+)").unwrap();
        let part = Regex::new(
            r"\b(Put|Update|Delete|ConditionCheck)::builder\(\)(?s:.){0,200}?tables\.(\w+)",
        )
        .unwrap();
        let mut out: BTreeSet<(String, String)> = call
            .captures_iter(source)
            .map(|c| (c[2].to_owned(), action(&c[1])))
            .collect();
        for c in part.captures_iter(source) {
            let op = if &c[1] == "ConditionCheck" {
                "ConditionCheckItem".to_owned()
            } else {
                format!("{}Item", &c[1])
            };
            out.insert((c[2].to_owned(), format!("dynamodb:{op}")));
        }
        out
    }

    /// The calls of a role's source, with those of the public helpers it uses: of the orders
    /// table's module (`store::read_order`) or of another handler.
    fn role_calls(role: &str, source: &str) -> BTreeSet<(String, String)> {
        let function = Regex::new(r"(?m)^pub (?:async )?fn (\w+)").unwrap();
        let mut out = table_calls(source);
        let helpers = SOURCES
            .iter()
            .filter(|(r, _)| *r != role)
            .chain(std::iter::once(&("store", include_str!("store.rs"))));
        for (other, other_source) in helpers {
            for f in function.captures_iter(other_source) {
                let name = &f[1];
                if source.contains(&format!("{other}::{name}(")) {
                    let start = f.get(0).unwrap().start();
                    let end = other_source[start..]
                        .find("\n}\n")
                        .map_or(other_source.len(), |e| start + e);
                    out.extend(table_calls(&other_source[start..end]));
                }
            }
        }
        out
    }

    fn sends(role: &str, source: &str) -> BTreeSet<String> {
        let literal = Regex::new(r#"Outgoing::new\(\s*"(\w+)""#).unwrap();
        let mut out: BTreeSet<String> = literal
            .captures_iter(source)
            .map(|c| c[1].to_owned())
            .collect();
        if role == "ingestion" {
            for kind in crate::ingestion::ROUTED_TYPES {
                out.insert(crate::ingestion::route(kind).expect("routed").to_owned());
            }
        }
        out
    }

    #[test]
    fn every_role_calls_exactly_what_the_access_table_declares() {
        for (role, source) in SOURCES {
            let declared = access::of(role).expect("declared");
            let want: BTreeSet<(String, String)> = declared
                .tables
                .iter()
                .flat_map(|(t, actions)| {
                    actions
                        .iter()
                        .map(move |a| ((*t).to_owned(), (*a).to_owned()))
                })
                .collect();
            assert_eq!(role_calls(role, source), want, "DynamoDB calls of {role}");
            let want: BTreeSet<String> =
                declared.sends_to.iter().map(|s| (*s).to_owned()).collect();
            assert_eq!(sends(role, source), want, "queues {role} forwards to");
        }
    }

    #[test]
    fn helpers_of_other_handlers_and_transaction_parts_count() {
        let warehouse = role_calls("warehouse", include_str!("warehouse.rs"));
        assert!(
            warehouse.contains(&("orders".to_owned(), "dynamodb:GetItem".to_owned())),
            "read_order: {warehouse:?}"
        );
        let transaction = "transact_items(TransactWriteItem::builder().put(Put::builder().table_name(&self.store.tables.catalog).build()))";
        assert!(
            table_calls(transaction)
                .contains(&("catalog".to_owned(), "dynamodb:PutItem".to_owned())),
            "a transaction's Put counts"
        );
    }

    #[test]
    fn the_derivation_sees_a_call_that_the_table_does_not_declare() {
        let sneaky = r#"self.store.client.delete_item().table_name(&self.store.tables.catalog)"#;
        assert_eq!(
            table_calls(sneaky),
            BTreeSet::from([("catalog".to_owned(), "dynamodb:DeleteItem".to_owned())])
        );
    }
}
