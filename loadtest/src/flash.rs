//! The flash-sale scenario (`loadtest --flash-share 50`): a share of the orders each take a line
//! on one of a few hot products, with DynamoDB's per-item limit and transaction conflicts
//! injected (scaled down, see [`fleet_common::faults`]) so that the emulator shows what one hot
//! item does to the fleet. Measured: packed orders a second, throttles and conflicts met, and
//! oversell: every unit packed on a hot product must have left its stock, and no more.

use std::collections::BTreeMap;

use fleet_harness::scenario::Flash;
use serde::Serialize;
use workers::store::{OrderRecord, Tables};

use crate::probe::{self, Metrics};

/// DynamoDB's write limit on one partition (and so on one item), units a second.
pub const AWS_ITEM_WRITE_UNITS: f64 = 1_000.0;

/// A flash sale's settings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FlashRun {
    /// Which orders and products.
    pub sale: Flash,
    /// Write units a second one item takes before it is throttled (`None`: no limit injected).
    pub item_limit: Option<f64>,
    /// The hot products' stock split over this many items (1: not sharded).
    pub shards: u32,
}

impl FlashRun {
    /// The catalog with the hot products' stock split over [`Self::shards`] items.
    pub fn shard(&self, catalog: &mut workers::catalog::CatalogFile) {
        let hot = self.sale.hot_skus(catalog);
        for p in catalog.products.iter_mut().filter(|p| hot.contains(&p.sku)) {
            p.stock_shards = (self.shards > 1).then_some(self.shards);
        }
    }

    /// The fault plan the fleet runs under (`FLEET_FAULTS`): the per-item limit, and conflicts
    /// between transactions on one item, which DynamoDB produces whatever the limit.
    pub fn fault_plan(&self) -> String {
        let mut plan = String::from("dynamodb:*:conflict:1");
        if let Some(limit) = self.item_limit {
            plan = format!("dynamodb:*:item_limit={limit}:1; {plan}");
        }
        plan
    }
}

/// What the flash sale came to.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlashReport {
    /// Share of orders with a hot line, percent.
    pub hot_share_percent: f64,
    /// The hot products.
    pub hot_skus: Vec<String>,
    /// Injected per-item limit, write units a second (it stands for DynamoDB's 1,000).
    pub item_limit: Option<f64>,
    /// Items each hot product's stock is split over.
    pub shards: u32,
    /// Orders packed by the warehouse.
    pub packed_orders: u64,
    /// Of which with a line on a hot product.
    pub hot_orders: u64,
    /// Packed orders over the order phase, a second.
    pub packed_orders_per_sec: f64,
    /// The same, as it would be on AWS: scaled by 1,000 / item_limit (the emulator shows the
    /// hot item's limit at that fraction of the load).
    pub packed_orders_per_sec_at_aws_scale: Option<f64>,
    /// Writes refused for the item limit.
    pub item_throttles: f64,
    /// Writes cancelled for a conflict with another under way on one item.
    pub conflicts: f64,
    /// Units packed on hot products minus the units their stock lost: more than 0 is oversell,
    /// less than 0 stock taken for nothing. Must be 0 for every product.
    pub oversell_units: i64,
    /// Per hot product: (stock before, stock after, units packed).
    pub stock: BTreeMap<String, (i64, i64, i64)>,
}

impl FlashReport {
    /// Reads the hot products' stock and counts what the orders packed.
    ///
    /// # Errors
    /// DynamoDB errors reading the catalog.
    pub async fn measure(
        run: &FlashRun,
        dynamodb: &aws_sdk_dynamodb::Client,
        tables: &Tables,
        stock_before: &BTreeMap<String, i64>,
        orders: &BTreeMap<String, OrderRecord>,
        order_phase_secs: f64,
        metrics: Option<&Metrics>,
    ) -> anyhow::Result<Self> {
        let packed: Vec<&OrderRecord> = orders.values().filter(|o| is_packed(o)).collect();
        let mut report = Self {
            hot_share_percent: run.sale.share * 100.0,
            hot_skus: stock_before.keys().cloned().collect(),
            item_limit: run.item_limit,
            shards: run.shards,
            packed_orders: packed.len() as u64,
            hot_orders: packed
                .iter()
                .filter(|o| o.lines.iter().any(|l| stock_before.contains_key(&l.sku)))
                .count() as u64,
            packed_orders_per_sec: packed.len() as f64 / order_phase_secs.max(1e-9),
            ..Self::default()
        };
        report.packed_orders_per_sec_at_aws_scale = run
            .item_limit
            .map(|l| report.packed_orders_per_sec * AWS_ITEM_WRITE_UNITS / l);
        if let Some(m) = metrics {
            report.item_throttles =
                probe::sum(m, "fleet_faults_injected_total", &["fault=\"item_limit\""]);
            report.conflicts =
                probe::sum(m, "fleet_faults_injected_total", &["fault=\"conflict\""]);
        }
        for (sku, before) in stock_before {
            let after = workers::catalog::total_stock(dynamodb, &tables.catalog, sku)
                .await?
                .map_or(0, |s| s as i64);
            let units: i64 = packed
                .iter()
                .flat_map(|o| &o.lines)
                .filter(|l| &l.sku == sku)
                .map(|l| i64::from(l.quantity))
                .sum();
            report.oversell_units += units - (before - after);
            report.stock.insert(sku.clone(), (*before, after, units));
        }
        Ok(report)
    }

    /// One line for the summary.
    pub fn summary(&self) -> String {
        format!(
            "flash sale: {:.0}% of orders on {:?} ({} stock shards, item limit {}): {} packed ({} hot) at {:.1}/s{}; {:.0} item throttles, {:.0} conflicts; oversell {} units",
            self.hot_share_percent,
            self.hot_skus,
            self.shards,
            self.item_limit.map_or("off".to_owned(), |l| format!("{l} units/s")),
            self.packed_orders,
            self.hot_orders,
            self.packed_orders_per_sec,
            self.packed_orders_per_sec_at_aws_scale
                .map_or(String::new(), |a| format!(" (≈ {a:.0}/s at AWS scale)")),
            self.item_throttles,
            self.conflicts,
            self.oversell_units
        )
    }
}

/// Packed by the warehouse: its `packed` history entry is there.
fn is_packed(order: &OrderRecord) -> bool {
    order
        .history
        .iter()
        .any(|h| h.stage == "warehouse" && h.event == "packed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fault_plan_carries_the_limit_and_conflicts_and_parses() {
        let run = FlashRun {
            sale: Flash {
                share: 0.5,
                products: 1,
            },
            item_limit: Some(50.0),
            shards: 1,
        };
        let plan = run.fault_plan();
        assert_eq!(plan, "dynamodb:*:item_limit=50:1; dynamodb:*:conflict:1");
        assert_eq!(
            fleet_common::faults::FaultPlan::parse(&plan)
                .unwrap()
                .rules()
                .len(),
            2
        );
        let off = FlashRun {
            item_limit: None,
            ..run
        };
        assert_eq!(off.fault_plan(), "dynamodb:*:conflict:1");
    }
}
