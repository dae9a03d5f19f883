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

/// Writes every product (stock reset) with BatchWriteItem; returns the count.
///
/// # Errors
/// When DynamoDB refuses the writes.
pub async fn seed(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    file: &CatalogFile,
) -> anyhow::Result<usize> {
    let requests: Vec<WriteRequest> = file
        .products
        .iter()
        .map(|p| {
            let product = Product {
                pk: p.sku.clone(),
                name: p.name.clone(),
                price: p.price,
                stock: p.stock,
                substitute: p.substitute.clone(),
            };
            WriteRequest::builder()
                .put_request(
                    PutRequest::builder()
                        .set_item(Some(store::to_item(&product)))
                        .build()
                        .expect("item is set"),
                )
                .build()
        })
        .collect();
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
    Ok(requests.len())
}

#[cfg(test)]
mod tests {
    use super::*;

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
