//! Generated loads with known outcomes, and the audit that checks a run against them: every
//! order in its expected state, every rejected input in a DLQ with the right reason, no effect
//! applied twice, nothing lost. Used by the demo, the end-to-end tests and the load harness.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_dynamodb::types::AttributeValue;
use fleet_common::contract::{
    Address, DeliveryStatus, Money, OrderLine, OrderStatus, OrderSubmitted,
    DELIVERY_STATUS_REPORTED, ORDER_SUBMITTED,
};
use fleet_common::failure::Reason;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use workers::catalog::{CatalogEntry, CatalogFile};
use workers::store::{self, OrderRecord, Product};

/// Weights of the kinds of order submissions in a load.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Mix {
    /// Valid orders.
    pub valid: u32,
    /// Valid orders sent twice (same event id).
    pub duplicate: u32,
    /// Bodies that break the contract.
    pub malformed: u32,
    /// Orders with a product not in the catalog.
    pub unknown_sku: u32,
    /// Orders with a price that differs from the catalog.
    pub wrong_price: u32,
    /// Orders with an out-of-stock line.
    pub out_of_stock: u32,
}

impl Mix {
    /// Valid orders only: every one completes (redrive and trace tests).
    pub const VALID_ONLY: Mix = Mix {
        valid: 1,
        duplicate: 0,
        malformed: 0,
        unknown_sku: 0,
        wrong_price: 0,
        out_of_stock: 0,
    };
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            valid: 60,
            duplicate: 10,
            malformed: 8,
            unknown_sku: 7,
            wrong_price: 7,
            out_of_stock: 8,
        }
    }
}

/// A flash sale: a share of the valid orders each take a line on one of a few hot products.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Flash {
    /// Share of orders with a line on a hot product, 0–1.
    pub share: f64,
    /// How many products are hot (the first in-stock ones of the catalog).
    pub products: usize,
}

impl Flash {
    /// The hot products: the first `products` of the catalog with stock for a sale (1,000 or
    /// more).
    pub fn hot_skus(&self, catalog: &CatalogFile) -> Vec<String> {
        catalog
            .products
            .iter()
            .filter(|p| p.stock >= 1_000)
            .take(self.products.max(1))
            .map(|p| p.sku.clone())
            .collect()
    }
}

/// One message to send to the ingest queue.
#[derive(Debug, Clone)]
pub struct Input {
    /// The body.
    pub body: String,
    /// The order it concerns, if any.
    pub order_id: Option<String>,
}

/// What an order must look like at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// `packed`, `unpackable` or `rejected`.
    pub status: OrderStatus,
    /// For packed orders: (sku, substituted_for) per line, in order.
    pub lines: Vec<(String, Option<String>)>,
    /// For rejected orders: the reason codes, each `code:sku`.
    pub reasons: Vec<String>,
    /// The delivery status it must reach, when carrier events are sent for it.
    pub delivery: Option<&'static str>,
    /// The submission as sent: the record replicates it.
    pub submitted: Option<OrderSubmitted>,
    /// The submitting event's id.
    pub event_id: String,
    /// The distinct carrier events sent for it: (event id, status).
    pub carrier: Vec<(String, DeliveryStatus)>,
}

/// A generated load.
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    /// Order submissions, malformed bodies and duplicates, shuffled.
    pub submissions: Vec<Input>,
    /// Carrier events (sent once the orders are packed), shuffled, with late and repeated ones.
    pub carrier_events: Vec<Input>,
    /// The expected end state of every order that should exist.
    pub expected: BTreeMap<String, Expected>,
    /// Expected DLQ contents: (logical queue, reason) → count.
    pub expected_dead_letters: BTreeMap<(String, String), u64>,
    /// The hot products of a flash sale (empty otherwise).
    pub hot_skus: Vec<String>,
}

impl Scenario {
    /// Generates `orders` submissions with `mix`, from `seed`, against `catalog`. `tag` makes
    /// ids unique across runs.
    pub fn generate(orders: usize, mix: Mix, catalog: &CatalogFile, seed: u64, tag: &str) -> Self {
        Self::generate_with(orders, mix, None, catalog, seed, tag)
    }

    /// [`Self::generate`], with a flash sale on a few products when `flash` is set.
    pub fn generate_with(
        orders: usize,
        mix: Mix,
        flash: Option<Flash>,
        catalog: &CatalogFile,
        seed: u64,
        tag: &str,
    ) -> Self {
        let mut s = Scenario::default();
        if let Some(f) = flash {
            s.hot_skus = f.hot_skus(catalog);
        }
        let mut g = Generator {
            rng: StdRng::seed_from_u64(seed),
            in_stock: catalog
                .products
                .iter()
                .filter(|p| p.stock >= 1_000)
                .collect(),
            out_of_stock: catalog.products.iter().filter(|p| p.stock == 0).collect(),
            weights: [
                mix.valid,
                mix.duplicate,
                mix.malformed,
                mix.unknown_sku,
                mix.wrong_price,
                mix.out_of_stock,
            ],
            flash,
            tag,
        };
        for i in 0..orders {
            g.order(&mut s, i);
        }
        // Events for orders nobody placed.
        for j in 0..(orders / 100).max(1) {
            let id = format!("{tag}-ghost{j}");
            let body = carrier_body(
                &id,
                &format!("{tag}-ghost-ev{j}"),
                DeliveryStatus::InTransit,
            );
            s.carrier_events.push(Input {
                body,
                order_id: None,
            });
            *s.expected_dead_letters
                .entry(("delivery".into(), Reason::UNKNOWN_ORDER.as_str().into()))
                .or_default() += 1;
        }
        s.submissions.shuffle(&mut g.rng);
        s.carrier_events.shuffle(&mut g.rng);
        s
    }
}

/// What a scenario is drawn from: the seeded generator, the products, the mix's weights.
struct Generator<'a> {
    rng: StdRng,
    in_stock: Vec<&'a CatalogEntry>,
    out_of_stock: Vec<&'a CatalogEntry>,
    /// valid, duplicate, malformed, unknown_sku, wrong_price, out_of_stock.
    weights: [u32; 6],
    flash: Option<Flash>,
    tag: &'a str,
}

impl<'a> Generator<'a> {
    /// The kind of order `i` (an index into `weights`).
    fn kind(&mut self) -> Option<usize> {
        let total: u32 = self.weights.iter().sum::<u32>().max(1);
        let mut pick = self.rng.random_range(0..total);
        self.weights.iter().position(|w| {
            if pick < *w {
                true
            } else {
                pick -= w;
                false
            }
        })
    }

    /// One to three products in stock; in a flash sale the hot product takes the first line
    /// of its share of orders (unless the order has it already).
    fn products(&mut self, hot_skus: &[String]) -> Vec<&'a CatalogEntry> {
        let line_count = self.rng.random_range(1..=3);
        let mut products: Vec<&CatalogEntry> = self
            .in_stock
            .choose_multiple(&mut self.rng, line_count)
            .copied()
            .collect();
        if let Some(f) = self.flash {
            if self.rng.random_bool(f.share.clamp(0.0, 1.0)) {
                let hot = &hot_skus[self.rng.random_range(0..hot_skus.len())];
                if !products.iter().any(|p| &p.sku == hot) {
                    products[0] = self
                        .in_stock
                        .iter()
                        .find(|p| &p.sku == hot)
                        .expect("hot products are in stock");
                }
            }
        }
        products
    }

    /// Order `i`: its submission (twice for a duplicate), what it should end as, and its
    /// carrier events when it should be packed (some repeated, as carriers do).
    fn order(&mut self, s: &mut Scenario, i: usize) {
        let tag = self.tag;
        let order_id = format!("{tag}-o{i:05}");
        let event_id = format!("{tag}-e{i:05}");
        let kind = self.kind();
        let products = self.products(&s.hot_skus);
        let mut lines: Vec<OrderLine> = products
            .iter()
            .map(|p| line(p, self.rng.random_range(1..=4)))
            .collect();
        let mut expected = Expected {
            status: OrderStatus::Packed,
            lines: lines.iter().map(|l| (l.sku.clone(), None)).collect(),
            reasons: vec![],
            delivery: None,
            submitted: None,
            event_id: event_id.clone(),
            carrier: vec![],
        };
        match kind {
            Some(0) | Some(1) => {}
            Some(2) => {
                let (body, reason) = malformed(&mut self.rng, &order_id, &event_id);
                s.submissions.push(Input {
                    body,
                    order_id: None,
                });
                *s.expected_dead_letters
                    .entry(("ingest".into(), reason.into()))
                    .or_default() += 1;
                return;
            }
            Some(3) => {
                lines[0].sku = format!("NOPE-{i:05}");
                expected = rejected(&event_id, vec![format!("unknown_sku:{}", lines[0].sku)]);
            }
            Some(4) => {
                lines[0].unit_price.amount_minor += 1;
                expected = rejected(&event_id, vec![format!("price_mismatch:{}", lines[0].sku)]);
            }
            _ => self.out_of_stock_line(&mut lines, &mut expected),
        }
        let (body, submitted) = submission(
            &order_id,
            &event_id,
            &format!("u-{}", i % 97),
            lines,
            &mut self.rng,
        );
        expected.submitted = Some(submitted);
        s.submissions.push(Input {
            body: body.clone(),
            order_id: Some(order_id.clone()),
        });
        if kind == Some(1) {
            s.submissions.push(Input {
                body,
                order_id: Some(order_id.clone()),
            });
        }
        if expected.status == OrderStatus::Packed {
            expected.delivery = Some("delivered");
            let mut events = carrier_events(&order_id);
            expected.carrier = carrier_statuses(&order_id);
            // Some carriers repeat themselves.
            if self.rng.random_bool(0.2) {
                let again = events[self.rng.random_range(0..events.len())].clone();
                events.push(again);
            }
            s.carrier_events.extend(events);
        }
        s.expected.insert(order_id, expected);
    }

    /// An out-of-stock line, alone in its order three times in ten: substituted when the
    /// product has a substitute, else removed (the order unpackable when nothing is left).
    fn out_of_stock_line(&mut self, lines: &mut Vec<OrderLine>, expected: &mut Expected) {
        let oos = self
            .out_of_stock
            .choose(&mut self.rng)
            .expect("the catalog has out-of-stock products");
        let alone = self.rng.random_bool(0.3);
        if alone {
            lines.clear();
            expected.lines.clear();
        }
        lines.push(line(oos, 1));
        // Lines are packed one by one, so a substitute is taken even when the order has it on
        // another line already.
        if let Some(sub) = &oos.substitute {
            expected.lines.push((sub.clone(), Some(oos.sku.clone())));
        }
        if expected.lines.is_empty() {
            expected.status = OrderStatus::Unpackable;
        }
    }
}

fn rejected(event_id: &str, reasons: Vec<String>) -> Expected {
    Expected {
        status: OrderStatus::Rejected,
        lines: vec![],
        reasons,
        delivery: None,
        submitted: None,
        event_id: event_id.to_owned(),
        carrier: vec![],
    }
}

fn line(p: &CatalogEntry, quantity: u32) -> OrderLine {
    OrderLine {
        sku: p.sku.clone(),
        quantity,
        unit_price: p.price,
    }
}

const FIRST: [&str; 6] = ["Jane", "Omar", "Li", "Amara", "Pierre", "Sofia"];
const LAST: [&str; 6] = ["Doe", "Haddad", "Wei", "Okafor", "Martin", "Rossi"];

/// A name, e-mail, phone and address that look real: the logs must never show them.
pub fn personal_data(rng: &mut impl Rng) -> (String, String, Address) {
    let first = FIRST[rng.random_range(0..FIRST.len())];
    let last = LAST[rng.random_range(0..LAST.len())];
    let email = format!(
        "{}.{}{}@example.com",
        first.to_lowercase(),
        last.to_lowercase(),
        rng.random_range(10..99)
    );
    let address = Address {
        name: format!("{first} {last}"),
        line1: format!("{} Rue des Lilas", rng.random_range(1..200)),
        line2: None,
        city: "Lyon".into(),
        postal_code: "69001".into(),
        country: "FR".into(),
        phone: Some(format!(
            "+33 6 {:02} {:02} {:02} {:02}",
            rng.random_range(10..99),
            rng.random_range(10..99),
            rng.random_range(10..99),
            rng.random_range(10..99)
        )),
    };
    (format!("{first} {last}"), email, address)
}

fn submission(
    order_id: &str,
    event_id: &str,
    user_id: &str,
    lines: Vec<OrderLine>,
    rng: &mut impl Rng,
) -> (String, OrderSubmitted) {
    let (_, email, address) = personal_data(rng);
    let payload = OrderSubmitted {
        order_id: order_id.into(),
        user_id: user_id.into(),
        email: Some(email),
        lines,
        delivery_address: address,
        payment_reference: format!("pay_{:012x}", rng.random::<u64>() & 0xffff_ffff_ffff),
    };
    let body = envelope(
        ORDER_SUBMITTED,
        event_id,
        serde_json::to_value(&payload).expect("payload serializes"),
    );
    (body, payload)
}

fn envelope(kind: &str, event_id: &str, payload: serde_json::Value) -> String {
    serde_json::json!({
        "type": kind, "schema_version": 1, "event_id": event_id,
        "occurred_at": store::now_rfc3339(), "payload": payload
    })
    .to_string()
}

fn malformed(rng: &mut impl Rng, order_id: &str, event_id: &str) -> (String, &'static str) {
    let valid = serde_json::from_str::<serde_json::Value>(
        &submission(
            order_id,
            event_id,
            "u-x",
            vec![OrderLine {
                sku: "SKU-0001".into(),
                quantity: 1,
                unit_price: Money {
                    amount_minor: 100,
                    currency: fleet_common::contract::Currency::try_from("EUR".to_owned())
                        .expect("valid"),
                },
            }],
            rng,
        )
        .0,
    )
    .expect("valid JSON");
    match rng.random_range(0..5) {
        0 => (
            "{\"type\": \"order.submitted\", \"payload\": ".to_owned(),
            Reason::MALFORMED_JSON.as_str(),
        ),
        1 => {
            let mut v = valid;
            v["payload"]["card_number"] = serde_json::json!("4111 1111 1111 1111");
            (v.to_string(), Reason::PAYMENT_DATA.as_str())
        }
        2 => {
            let mut v = valid;
            v["payload"]["lines"][0]["unit_price"]["amount_minor"] = serde_json::json!(12.99);
            (v.to_string(), Reason::SCHEMA_VIOLATION.as_str())
        }
        3 => {
            let mut v = valid;
            v["payload"]
                .as_object_mut()
                .expect("object")
                .remove("payment_reference");
            (v.to_string(), Reason::SCHEMA_VIOLATION.as_str())
        }
        _ => {
            let mut v = valid;
            v["type"] = serde_json::json!("order.cancelled");
            (v.to_string(), "unknown_type")
        }
    }
}

/// The carrier events of an order: (event id, status), in the order the carrier sends them.
fn carrier_statuses(order_id: &str) -> Vec<(String, DeliveryStatus)> {
    [
        DeliveryStatus::LabelCreated,
        DeliveryStatus::InTransit,
        DeliveryStatus::OutForDelivery,
        DeliveryStatus::Delivered,
    ]
    .iter()
    .enumerate()
    .map(|(k, status)| (format!("{order_id}-c{k}"), *status))
    .collect()
}

fn carrier_events(order_id: &str) -> Vec<Input> {
    carrier_statuses(order_id)
        .into_iter()
        .map(|(event_id, status)| Input {
            body: carrier_body(order_id, &event_id, status),
            order_id: Some(order_id.to_owned()),
        })
        .collect()
}

fn carrier_body(order_id: &str, event_id: &str, status: DeliveryStatus) -> String {
    envelope(
        DELIVERY_STATUS_REPORTED,
        event_id,
        serde_json::json!({"order_id": order_id, "status": status, "at": store::now_rfc3339(), "carrier_reference": format!("trk-{order_id}")}),
    )
}

/// The audit of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    /// Orders the scenario expects.
    pub orders_expected: u64,
    /// Orders in their expected final state, accepted or rejected.
    pub orders_completed: u64,
    /// Of those, rejected orders.
    pub orders_rejected: u64,
    /// Expected orders missing or not in their expected state.
    pub lost: u64,
    /// Effects applied more than once (history entries, stock moves).
    pub duplicate_effects: u64,
    /// Orders that should not exist.
    pub unexpected_orders: u64,
    /// What is wrong, one line per problem (ids and codes only), at most 50.
    pub offenders: Vec<String>,
}

impl Audit {
    fn offend(&mut self, text: String) {
        if self.offenders.len() < 50 {
            self.offenders.push(text);
        }
    }

    /// Stock: what left each shelf equals what the packed orders hold of it, so no stock was
    /// taken twice (or taken for an order that does not show it). `stock`: each product's now,
    /// summed over its shards.
    fn check_stock(
        &mut self,
        orders: &BTreeMap<String, OrderRecord>,
        products: &BTreeMap<String, Product>,
        stock: &BTreeMap<String, u64>,
        catalog: &CatalogFile,
    ) {
        let mut shipped: BTreeMap<&str, u64> = BTreeMap::new();
        for order in orders.values().filter(|o| o.status == OrderStatus::Packed) {
            for line in &order.lines {
                *shipped.entry(line.sku.as_str()).or_default() += u64::from(line.quantity);
            }
        }
        for entry in &catalog.products {
            if !products.contains_key(&entry.sku) {
                continue;
            }
            let now = stock.get(&entry.sku).copied().unwrap_or(0);
            let moved = entry.stock.saturating_sub(now);
            let held = shipped.get(entry.sku.as_str()).copied().unwrap_or(0);
            if moved != held {
                self.duplicate_effects += 1;
                self.offend(format!(
                    "{}: stock moved {moved} but packed orders hold {held}",
                    entry.sku
                ));
            }
        }
    }
}

/// Reads every order and product, and checks them against the scenario.
///
/// # Errors
/// When DynamoDB cannot be read.
pub async fn audit(
    client: &aws_sdk_dynamodb::Client,
    tables: &store::Tables,
    scenario: &Scenario,
    catalog: &CatalogFile,
    with_delivery: bool,
) -> anyhow::Result<Audit> {
    Ok(
        audit_with_orders(client, tables, scenario, catalog, with_delivery)
            .await?
            .0,
    )
}

/// [`audit`], also returning the orders it read (by order id), for callers that look at them
/// further without reading the table again.
///
/// # Errors
/// When DynamoDB cannot be read.
pub async fn audit_with_orders(
    client: &aws_sdk_dynamodb::Client,
    tables: &store::Tables,
    scenario: &Scenario,
    catalog: &CatalogFile,
    with_delivery: bool,
) -> anyhow::Result<(Audit, BTreeMap<String, OrderRecord>)> {
    let orders: BTreeMap<String, OrderRecord> = scan(client, &tables.orders)
        .await?
        .into_iter()
        .filter_map(|item| serde_dynamo::from_item::<_, OrderRecord>(item).ok())
        .map(|o| (o.order_id.clone(), o))
        .collect();
    let items = scan(client, &tables.catalog).await?;
    let products: BTreeMap<String, Product> = items
        .iter()
        .filter_map(|item| serde_dynamo::from_item::<_, Product>(item.clone()).ok())
        .map(|p| (p.pk.clone(), p))
        .collect();
    // A hot product's stock is the sum over its shards.
    let stock = workers::catalog::stock_totals(&items);
    let mut a = Audit {
        orders_expected: scenario.expected.len() as u64,
        ..Audit::default()
    };
    let names: BTreeMap<&str, &CatalogEntry> = catalog
        .products
        .iter()
        .map(|p| (p.sku.as_str(), p))
        .collect();
    for (id, want) in &scenario.expected {
        let Some(order) = orders.get(id) else {
            a.lost += 1;
            a.offend(format!("{id}: missing"));
            continue;
        };
        let differences = record_differences(order, want, &names, with_delivery);
        if differences.is_empty() {
            a.orders_completed += 1;
            if want.status == OrderStatus::Rejected {
                a.orders_rejected += 1;
            }
        } else {
            a.lost += 1;
            a.offend(format!("{id}: {}", differences.join("; ")));
        }
        let mut seen = BTreeSet::new();
        for h in &order.history {
            if !seen.insert((&h.stage, &h.event, &h.event_id, &h.note)) {
                a.duplicate_effects += 1;
                a.offend(format!(
                    "{id}: history entry {}/{} applied twice",
                    h.stage, h.event
                ));
            }
        }
    }
    a.unexpected_orders = orders
        .keys()
        .filter(|id| !scenario.expected.contains_key(*id))
        .count() as u64;
    a.check_stock(&orders, &products, &stock, catalog);
    Ok((a, orders))
}

/// One history entry as the audit compares it: (stage, event, event id, note). Delivery
/// entries are compared without their note, which says whether the event arrived late: that
/// depends on arrival order, which no run controls.
type EntryKey = (String, String, String, Option<String>);

/// Every field of `order` that differs from what an undisturbed run leaves for `want` (empty
/// when the record is exactly as expected). `with_delivery`: the order's carrier events were
/// sent; without them a packed order ends awaiting the carrier.
pub fn record_differences(
    order: &OrderRecord,
    want: &Expected,
    names: &BTreeMap<&str, &CatalogEntry>,
    with_delivery: bool,
) -> Vec<String> {
    let mut d = Differences::default();
    d.check(
        "status",
        order.status == want.status,
        order.status.to_string(),
        want.status.to_string(),
    );
    d.check(
        "event_id",
        unsent(&order.event_id) == want.event_id,
        order.event_id.clone(),
        want.event_id.clone(),
    );
    d.check(
        "correlation_id",
        !order.correlation_id.is_empty(),
        "empty".into(),
        "set".into(),
    );
    d.check(
        "source",
        order.source.as_deref().is_some_and(|s| !s.is_empty()),
        format!("{:?}", order.source),
        "the edge's stamp".into(),
    );
    let Some(sub) = &want.submitted else {
        d.check("submission", false, "unknown".into(), "known".into());
        return d.0;
    };
    d.submission(order, want, sub, names);
    let carrier: &[(String, DeliveryStatus)] =
        if with_delivery && want.status == OrderStatus::Packed {
            &want.carrier
        } else {
            &[]
        };
    d.delivery(order, want, sub, carrier, with_delivery);
    d.history(order, want, sub, carrier);
    let version = 1
        + u32::from(want.status != OrderStatus::Rejected)
        + u32::from(want.status == OrderStatus::Packed)
        + carrier.len() as u32;
    d.check(
        "version",
        order.version == version,
        order.version.to_string(),
        version.to_string(),
    );
    d.0
}

/// The differences `record_differences` found, one line each.
#[derive(Default)]
struct Differences(Vec<String>);

impl Differences {
    fn check(&mut self, field: &str, ok: bool, got: String, expected: String) {
        if !ok {
            self.0
                .push(format!("{field} is {got}, expected {expected}"));
        }
    }

    /// What the order says of its submission: key, customer, payload, rejections, lines.
    fn submission(
        &mut self,
        order: &OrderRecord,
        want: &Expected,
        sub: &OrderSubmitted,
        names: &BTreeMap<&str, &CatalogEntry>,
    ) {
        self.check(
            "pk",
            order.pk == store::order_key(&sub.order_id),
            order.pk.clone(),
            store::order_key(&sub.order_id),
        );
        let same = "the submitted one";
        self.check(
            "user_id",
            order.user_id == sub.user_id,
            "another user".into(),
            same.into(),
        );
        self.check(
            "email",
            order.email == sub.email,
            "another e-mail".into(),
            same.into(),
        );
        self.check(
            "delivery_address",
            order.delivery_address == sub.delivery_address,
            "another address".into(),
            same.into(),
        );
        self.check(
            "payment_reference",
            order.payment_reference == sub.payment_reference,
            "another reference".into(),
            same.into(),
        );
        self.check(
            "payload_hash",
            order.payload_hash == fleet_common::contract::fingerprint(sub),
            order.payload_hash.clone(),
            "the submission's fingerprint".into(),
        );
        let mut reasons = order.rejection_reasons.clone();
        reasons.sort();
        let mut want_reasons = want.reasons.clone();
        want_reasons.sort();
        self.check(
            "rejection_reasons",
            reasons == want_reasons,
            format!("{reasons:?}"),
            format!("{want_reasons:?}"),
        );
        let lines = expected_lines(want, sub, names);
        self.check(
            "lines",
            order.lines == lines,
            format!("{:?}", order.lines),
            format!("{lines:?}"),
        );
    }

    /// The delivery state: its status and rank, and the events applied (the warehouse's
    /// hand-off among them).
    fn delivery(
        &mut self,
        order: &OrderRecord,
        want: &Expected,
        sub: &OrderSubmitted,
        carrier: &[(String, DeliveryStatus)],
        with_delivery: bool,
    ) {
        let delivery = match (want.status, with_delivery) {
            (OrderStatus::Packed, true) => want
                .carrier
                .iter()
                .map(|(_, s)| *s)
                .max_by_key(|s| s.rank())
                .or(Some(DeliveryStatus::AwaitingCarrier)),
            (OrderStatus::Packed, false) => Some(DeliveryStatus::AwaitingCarrier),
            _ => None,
        };
        self.check(
            "delivery_status",
            order.delivery_status.as_deref() == delivery.map(DeliveryStatus::as_str),
            format!("{:?}", order.delivery_status),
            format!("{:?}", delivery.map(DeliveryStatus::as_str)),
        );
        self.check(
            "delivery_rank",
            order.delivery_rank == delivery.map(DeliveryStatus::rank),
            format!("{:?}", order.delivery_rank),
            format!("{:?}", delivery.map(DeliveryStatus::rank)),
        );
        let events: BTreeMap<&str, &str> = order
            .delivery_events
            .iter()
            .map(|(k, v)| (unsent(k), v.split('#').next().unwrap_or_default()))
            .collect();
        let packed_id = order_packed_id(sub);
        let mut want_events: BTreeMap<&str, &str> = carrier
            .iter()
            .map(|(k, s)| (k.as_str(), s.as_str()))
            .collect();
        if want.status == OrderStatus::Packed {
            // The warehouse's hand-off is a delivery event of its own.
            want_events.insert(&packed_id, DeliveryStatus::AwaitingCarrier.as_str());
        }
        self.check(
            "delivery_events",
            events == want_events,
            format!("{events:?}"),
            format!("{want_events:?}"),
        );
    }

    /// The history: every entry expected, once, and the stages in pipeline order.
    fn history(
        &mut self,
        order: &OrderRecord,
        want: &Expected,
        sub: &OrderSubmitted,
        carrier: &[(String, DeliveryStatus)],
    ) {
        let history: BTreeSet<EntryKey> = order
            .history
            .iter()
            .map(|h| {
                (
                    h.stage.clone(),
                    h.event.clone(),
                    unsent(&h.event_id).to_owned(),
                    if h.stage == "delivery" {
                        None
                    } else {
                        h.note.clone()
                    },
                )
            })
            .collect();
        let want_history = expected_history(want, sub, carrier);
        self.check(
            "history",
            history == want_history.iter().cloned().collect(),
            format!("{history:?}"),
            format!("{want_history:?}"),
        );
        // The stages' entries come in pipeline order: orders, warehouse, then delivery.
        let stages: Vec<&str> = order.history.iter().map(|h| h.stage.as_str()).collect();
        let mut sorted = stages.clone();
        sorted.sort_by_key(|s| {
            ["orders", "warehouse", "delivery"]
                .iter()
                .position(|x| x == s)
        });
        self.check(
            "history order",
            stages == sorted,
            format!("{stages:?}"),
            "orders, warehouse, delivery".into(),
        );
    }
}

/// An event id as its producer sent it: the edge prefixes every upstream event id with its
/// sender's name (`<sender>:<id>`, the name lowercase letters, digits and `-`); the fleet's own
/// ids (`order.accepted:…`) are left as they are.
fn unsent(event_id: &str) -> &str {
    match event_id.split_once(':') {
        Some((sender, rest))
            if !sender.is_empty()
                && sender
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') =>
        {
            rest
        }
        _ => event_id,
    }
}

fn order_packed_id(sub: &OrderSubmitted) -> String {
    format!("{}:{}", fleet_common::contract::ORDER_PACKED, sub.order_id)
}

/// The lines an undisturbed run records: as submitted (named from the catalog) for a rejected
/// order; as packed, with substitutes at the price charged, for the others.
fn expected_lines(
    want: &Expected,
    sub: &OrderSubmitted,
    names: &BTreeMap<&str, &CatalogEntry>,
) -> Vec<store::RecordLine> {
    let named = |sku: &str| names.get(sku).map(|p| p.name.clone()).unwrap_or_default();
    let shards = |sku: &str| names.get(sku).and_then(|p| workers::catalog::shards(p));
    if want.status == OrderStatus::Rejected {
        return sub
            .lines
            .iter()
            .map(|l| store::RecordLine {
                sku: l.sku.clone(),
                name: named(&l.sku),
                quantity: l.quantity,
                unit_price: l.unit_price,
                substituted_for: None,
                stock_shards: shards(&l.sku),
            })
            .collect();
    }
    want.lines
        .iter()
        .filter_map(|(sku, substituted_for)| {
            let ordered = substituted_for.as_deref().unwrap_or(sku);
            let line = sub.lines.iter().find(|l| l.sku == ordered)?;
            Some(store::RecordLine {
                sku: sku.clone(),
                name: named(sku),
                quantity: line.quantity,
                unit_price: line.unit_price,
                substituted_for: substituted_for.clone(),
                stock_shards: shards(sku),
            })
        })
        .collect()
}

/// The history an undisturbed run writes: the orders stage's verdict; the warehouse's
/// substitutions, removals and result; awaiting the carrier; each carrier event once.
fn expected_history(
    want: &Expected,
    sub: &OrderSubmitted,
    carrier: &[(String, DeliveryStatus)],
) -> Vec<EntryKey> {
    let entry = |stage: &str, event: &str, event_id: String, note: Option<String>| {
        (stage.to_owned(), event.to_owned(), event_id, note)
    };
    let rejected = want.status == OrderStatus::Rejected;
    let mut out = vec![entry(
        "orders",
        if rejected {
            OrderStatus::Rejected
        } else {
            OrderStatus::Accepted
        }
        .as_str(),
        want.event_id.clone(),
        rejected.then(|| want.reasons.join(",")),
    )];
    if rejected {
        return out;
    }
    let accepted = format!(
        "{}:{}",
        fleet_common::contract::ORDER_ACCEPTED,
        sub.order_id
    );
    let packed_lines: BTreeSet<&str> = want.lines.iter().map(|(s, _)| s.as_str()).collect();
    let substituted: BTreeMap<&str, &str> = want
        .lines
        .iter()
        .filter_map(|(s, f)| f.as_deref().map(|f| (f, s.as_str())))
        .collect();
    for line in &sub.lines {
        if let Some(to) = substituted.get(line.sku.as_str()) {
            out.push(entry(
                "warehouse",
                "line_substituted",
                accepted.clone(),
                Some(format!("{} -> {to}", line.sku)),
            ));
        } else if !packed_lines.contains(line.sku.as_str()) {
            out.push(entry(
                "warehouse",
                "line_removed",
                accepted.clone(),
                Some(line.sku.clone()),
            ));
        }
    }
    out.push(entry(
        "warehouse",
        want.status.as_str(),
        accepted,
        Some(format!("{} of {} lines", want.lines.len(), sub.lines.len())),
    ));
    if want.status == OrderStatus::Packed {
        out.push(entry(
            "delivery",
            DeliveryStatus::AwaitingCarrier.as_str(),
            order_packed_id(sub),
            None,
        ));
        for (event_id, status) in carrier {
            out.push(entry("delivery", status.as_str(), event_id.clone(), None));
        }
    }
    out
}

/// Every item of a table.
///
/// # Errors
/// When the scan fails.
pub async fn scan(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
) -> anyhow::Result<Vec<std::collections::HashMap<String, AttributeValue>>> {
    let mut items = Vec::new();
    let mut start = None;
    loop {
        let out = client
            .scan()
            .table_name(table)
            .set_exclusive_start_key(start)
            .consistent_read(true)
            .send()
            .await?;
        items.extend(out.items().iter().cloned());
        start = out.last_evaluated_key().cloned();
        if start.is_none() {
            return Ok(items);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> CatalogFile {
        CatalogFile::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/catalog.json"),
        )
        .unwrap()
    }

    #[test]
    fn a_scenario_is_reproducible_and_covers_every_kind() {
        let a = Scenario::generate(500, Mix::default(), &catalog(), 7, "t");
        let b = Scenario::generate(500, Mix::default(), &catalog(), 7, "t");
        assert_eq!(a.expected, b.expected);
        let statuses: BTreeSet<&str> = a.expected.values().map(|e| e.status.as_str()).collect();
        assert_eq!(
            statuses,
            BTreeSet::from(["packed", "rejected", "unpackable"])
        );
        assert!(
            a.expected
                .values()
                .any(|e| e.lines.iter().any(|(_, sub)| sub.is_some())),
            "some lines are substituted"
        );
        assert!(a.expected_dead_letters.keys().any(|(q, _)| q == "ingest"));
        assert!(
            a.submissions.len() > a.expected.len(),
            "duplicates and malformed bodies are sent too"
        );
        // Every malformed body is refused by the contract.
        for input in a.submissions.iter().filter(|i| i.order_id.is_none()) {
            let parsed = serde_json::from_str::<serde_json::Value>(&input.body);
            assert!(parsed.map_or(true, |v| fleet_common::contract::validate(
                &v,
                &fleet_common::contract::EXTERNAL_TYPES
            )
            .is_err()));
        }
    }
}
