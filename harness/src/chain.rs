//! The four handlers chained in memory, without queues (the load harness's DynamoDB ceiling).

use fleet_common::config::FleetConfig;
use fleet_common::runtime::{Handler, Json, Message};
use workers::store::{Store, Tables};
use workers::{delivery, ingestion, orders, warehouse};

/// The four handlers chained in memory, without queues: each outcome's forward is handed
/// straight to the next stage's handler. What the backends can serve for the fleet's own work,
/// with no SQS in between (the load harness measures its ceiling with it).
pub struct Inline {
    ingestion: ingestion::Ingestion,
    orders: Json<orders::Orders>,
    warehouse: Json<warehouse::Warehouse>,
    delivery: Json<delivery::Delivery>,
}

impl Inline {
    /// The chain on `config`'s tables, with each role's downstream rate limit.
    ///
    /// # Errors
    /// A table or role that is not configured.
    pub fn new(config: &FleetConfig, dynamodb: &aws_sdk_dynamodb::Client) -> anyhow::Result<Self> {
        let tables = Tables::from_config(config)?;
        let store = |role: &'static str| -> anyhow::Result<Store> {
            Ok(Store::new(
                dynamodb.clone(),
                tables.clone(),
                role,
                config.worker(role)?.downstream_rate_per_sec,
            ))
        };
        Ok(Self {
            ingestion: ingestion::Ingestion::new(config.ingestion.clone()),
            orders: Json(orders::Orders::new(store("orders")?)),
            warehouse: Json(warehouse::Warehouse::new(store("warehouse")?)),
            delivery: Json(delivery::Delivery::new(store("delivery")?)),
        })
    }

    /// Takes `body` in at the edge and through every stage it is forwarded to; returns how many
    /// messages were handled (a failure ends the chain, as a dead letter would).
    pub async fn run(&self, body: String) -> usize {
        let mut pending = vec![("ingest".to_owned(), body)];
        let mut handled = 0;
        while let Some((queue, body)) = pending.pop() {
            let message = Message::for_test(body);
            let outcome = match queue.as_str() {
                "ingest" => self.ingestion.handle(&message).await,
                "orders" => self.orders.handle(&message).await,
                "warehouse" => self.warehouse.handle(&message).await,
                "delivery" => self.delivery.handle(&message).await,
                _ => continue,
            };
            handled += 1;
            if let Ok(outcome) = outcome {
                pending.extend(outcome.forward.into_iter().map(|f| (f.queue, f.body)));
            }
        }
        handled
    }
}
