//! The catalog file (`config/catalog.json`) and seeding it into the catalog table.

use std::collections::BTreeMap;
use std::path::Path;

use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
use fleet_common::contract::Money;
use serde::{Deserialize, Serialize};

use crate::store::{self, Product};

/// A catalog file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogFile {
    /// Every product.
    pub products: Vec<CatalogEntry>,
}

/// One product of the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// The sku.
    pub sku: String,
    /// Display name.
    pub name: String,
    /// Price.
    pub price: Money,
    /// Units in stock.
    pub stock: u64,
    /// Replacement when out of stock.
    #[serde(default)]
    pub substitute: Option<String>,
    /// A hot product: its stock split over this many items (1 to
    /// [`store::MAX_STOCK_SHARDS`]), so that a flash sale on it is not held to one item's write
    /// limit. Absent or 1: one item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stock_shards: Option<u32>,
}

/// The shard count a product's item records: `Some(n)` for n > 1, else `None`.
pub fn shards(entry: &CatalogEntry) -> Option<u32> {
    entry.stock_shards.filter(|n| *n > 1)
}

/// `stock` split over `shards` items as evenly as it goes, the first ones taking the remainder.
pub fn split_stock(stock: u64, shards: u32) -> Vec<u64> {
    let n = u64::from(shards.max(1));
    (0..n)
        .map(|k| stock / n + u64::from(k < stock % n))
        .collect()
}

/// Each product's stock from the catalog table's items: a product's own item plus its shards.
pub fn stock_totals(items: &[store::Item]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for item in items {
        let (Some(pk), Some(stock)) = (
            item.get("pk").and_then(|v| v.as_s().ok()),
            item.get("stock")
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse::<u64>().ok()),
        ) else {
            continue;
        };
        *out.entry(store::stock_item_owner(pk).0.to_owned())
            .or_default() += stock;
    }
    out
}

/// A product's stock now, summed over its shards (consistent reads); `None` when the product
/// does not exist.
///
/// # Errors
/// DynamoDB errors.
pub async fn total_stock(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    sku: &str,
) -> anyhow::Result<Option<u64>> {
    let read = |key: String| {
        client
            .get_item()
            .table_name(table)
            .key("pk", store::s(key))
            .consistent_read(true)
            .send()
    };
    let Some(item) = read(sku.to_owned()).await?.item().cloned() else {
        return Ok(None);
    };
    let product: Product =
        store::from_item(item.clone()).map_err(|e| anyhow::anyhow!("product {sku}: {e}"))?;
    let mut items = vec![item];
    for shard in 1..product.shards.unwrap_or(1) {
        if let Some(i) = read(store::stock_item(sku, shard)).await?.item() {
            items.push(i.clone());
        }
    }
    Ok(stock_totals(&items).get(sku).copied())
}

impl CatalogFile {
    /// Reads and checks a catalog file.
    ///
    /// # Errors
    /// A message naming the file and what is wrong in it.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read catalog {}: {e}", path.display()))?;
        let file: CatalogFile = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("catalog {} is invalid: {e}", path.display()))?;
        let skus: BTreeMap<&str, ()> = file.products.iter().map(|p| (p.sku.as_str(), ())).collect();
        for p in &file.products {
            if let Some(sub) = &p.substitute {
                anyhow::ensure!(
                    skus.contains_key(sub.as_str()),
                    "catalog {}: substitute {sub} of {} is not in the catalog",
                    path.display(),
                    p.sku
                );
            }
        }
        anyhow::ensure!(
            skus.len() == file.products.len(),
            "catalog {}: a sku appears twice",
            path.display()
        );
        for p in &file.products {
            anyhow::ensure!(
                p.stock_shards
                    .is_none_or(|n| (1..=store::MAX_STOCK_SHARDS).contains(&n)),
                "catalog {}: stock_shards of {} must be 1 to {}",
                path.display(),
                p.sku,
                store::MAX_STOCK_SHARDS
            );
            anyhow::ensure!(
                !p.sku.contains("#s"),
                "catalog {}: sku {} holds `#s`, which names stock shards",
                path.display(),
                p.sku
            );
        }
        Ok(file)
    }

    /// The file shipped in `config/`.
    pub fn default_path() -> &'static Path {
        Path::new("config/catalog.json")
    }

    /// Products by sku.
    pub fn by_sku(&self) -> BTreeMap<String, CatalogEntry> {
        self.products
            .iter()
            .map(|p| (p.sku.clone(), p.clone()))
            .collect()
    }
}

/// Writes every product (stock reset), a hot product's stock split over its shards, with
/// BatchWriteItem; returns the count of products.
///
/// # Errors
/// When DynamoDB refuses the writes.
pub async fn seed(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    file: &CatalogFile,
) -> anyhow::Result<usize> {
    let put = |item: store::Item| {
        WriteRequest::builder()
            .put_request(
                PutRequest::builder()
                    .set_item(Some(item))
                    .build()
                    .expect("item is set"),
            )
            .build()
    };
    let mut requests: Vec<WriteRequest> = Vec::new();
    for p in &file.products {
        let split = split_stock(p.stock, p.stock_shards.unwrap_or(1));
        let product = Product {
            pk: p.sku.clone(),
            name: p.name.clone(),
            price: p.price,
            stock: split[0],
            substitute: p.substitute.clone(),
            shards: shards(p),
        };
        requests.push(put(store::to_item(&product)));
        for (shard, stock) in (1..).zip(&split[1..]) {
            let mut item = store::Item::new();
            item.insert("pk".into(), store::s(store::stock_item(&p.sku, shard)));
            item.insert("stock".into(), store::n(stock));
            requests.push(put(item));
        }
    }
    for chunk in requests.chunks(25) {
        let mut pending = chunk.to_vec();
        for attempt in 0..8u32 {
            let out = client
                .batch_write_item()
                .request_items(table, pending.clone())
                .send()
                .await?;
            pending = out
                .unprocessed_items()
                .and_then(|u| u.get(table))
                .cloned()
                .unwrap_or_default();
            if pending.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
        }
        anyhow::ensure!(
            pending.is_empty(),
            "DynamoDB left {} catalog writes unprocessed",
            pending.len()
        );
    }
    Ok(file.products.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stock_splits_evenly_and_shards_sum_back_to_their_product() {
        assert_eq!(split_stock(10, 4), [3, 3, 2, 2]);
        assert_eq!(split_stock(2, 4), [1, 1, 0, 0]);
        assert_eq!(split_stock(7, 1), [7]);
        let item = |pk: &str, stock: u64| {
            store::Item::from([
                ("pk".to_owned(), store::s(pk)),
                ("stock".to_owned(), store::n(stock)),
            ])
        };
        let totals = stock_totals(&[
            item("HOT", 3),
            item("HOT#s1", 3),
            item("HOT#s3", 2),
            item("COLD", 5),
        ]);
        assert_eq!(
            totals,
            BTreeMap::from([("COLD".into(), 5), ("HOT".into(), 8)])
        );
    }

    #[test]
    fn the_shipped_catalog_is_valid_and_has_substitutes_and_stockouts() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/catalog.json");
        let file = CatalogFile::load(&path).unwrap();
        assert!(file
            .products
            .iter()
            .any(|p| p.stock == 0 && p.substitute.is_some()));
        assert!(file
            .products
            .iter()
            .any(|p| p.stock == 0 && p.substitute.is_none()));
    }
}
