//! The report of a run: figures, verdict, a human summary, JSON and SVG charts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use fleet_harness::scenario::{Audit, Scenario};
use hdrhistogram::Histogram;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use workers::store::OrderRecord;

use crate::ceiling::Ceiling;
use crate::probe::{self, Metrics, ProcessSample};
use crate::{charts, Options, Pace};
use fleet_common::aws::{DYNAMODB_READ_OPERATIONS, DYNAMODB_WRITE_OPERATIONS};

/// List prices used for the cost estimate (USD, us-east-1, on-demand, no free tier). Edit here
/// when AWS changes them.
pub const SQS_PER_MILLION_REQUESTS: f64 = 0.40;
/// DynamoDB on-demand, per million write request units.
pub const DDB_PER_MILLION_WRITE_UNITS: f64 = 0.625;
/// DynamoDB on-demand, per million read request units.
pub const DDB_PER_MILLION_READ_UNITS: f64 = 0.125;

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t_secs: f64,
    /// Messages the fleet completed per second (all stages).
    pub processed_per_sec: f64,
    /// Messages completed so far.
    pub processed_total: f64,
    /// ReceiveMessage + DeleteMessageBatch requests so far.
    pub receive_delete_total: f64,
    /// Messages visible or in flight on the work queues.
    pub backlog: u64,
    /// The fleet process's resident memory.
    pub rss_mib: f64,
    /// The fleet process's CPU use (100 = one core).
    pub cpu_percent: f64,
    /// Messages each stage completed per second, by queue (logical name).
    pub stages_per_sec: BTreeMap<String, f64>,
    /// Messages visible or in flight, by work queue (logical name).
    pub backlog_by_queue: BTreeMap<String, u64>,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Orders measured.
    pub count: u64,
    /// Median.
    pub p50_ms: u64,
    /// 90th percentile.
    pub p90_ms: u64,
    /// 99th percentile.
    pub p99_ms: u64,
    /// Slowest.
    pub max_ms: u64,
}

/// Ceilings and how close the fleet came.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Bound {
    /// Raw SQS receive+delete loop.
    pub sqs: Ceiling,
    /// Raw conditional writes.
    pub dynamodb: Ceiling,
    /// The fleet's own DynamoDB work without queues: messages per second through the four
    /// handlers chained in memory (locally; `None` against AWS).
    pub dynamodb_workload: Option<Ceiling>,
    /// Messages per second SQS allows the fleet, given its SQS requests per message.
    pub sqs_bound_messages_per_sec: f64,
    /// Messages per second DynamoDB allows the fleet: the workload ceiling when measured, else
    /// the raw conditional writes over the fleet's DynamoDB requests per message.
    pub dynamodb_bound_messages_per_sec: f64,
    /// Raw conditional writes over the fleet's DynamoDB requests per message: the bound if every
    /// request the fleet makes cost what a small conditional put costs.
    pub dynamodb_simple_put_bound_messages_per_sec: f64,
    /// `sqs` or `dynamodb`.
    pub bounding_backend: String,
    /// Fleet messages per second (at steady state) over the bound, percent.
    pub fleet_percent_of_bound: f64,
}

impl Bound {
    /// The bounds each backend sets on the fleet, given what it spent per message, and how
    /// close its steady rate came to the lower.
    fn set_bounds(&mut self, spend: &Spend, steady_messages_per_sec: f64) {
        let sqs_per_msg = spend.sqs_requests_per_message.max(0.001);
        let ddb_per_msg =
            (spend.dynamodb_writes_per_message + spend.dynamodb_reads_per_message).max(0.001);
        self.sqs_bound_messages_per_sec = round(self.sqs.requests_per_sec / sqs_per_msg);
        self.dynamodb_simple_put_bound_messages_per_sec =
            round(self.dynamodb.requests_per_sec / ddb_per_msg);
        self.dynamodb_bound_messages_per_sec = match &self.dynamodb_workload {
            Some(w) => round(w.units_per_sec),
            None => self.dynamodb_simple_put_bound_messages_per_sec,
        };
        let (name, bound) =
            if self.sqs_bound_messages_per_sec <= self.dynamodb_bound_messages_per_sec {
                ("sqs", self.sqs_bound_messages_per_sec)
            } else {
                ("dynamodb", self.dynamodb_bound_messages_per_sec)
            };
        self.bounding_backend = name.into();
        self.fleet_percent_of_bound = round(100.0 * steady_messages_per_sec / bound.max(0.001));
    }
}

/// What the fleet spent, counted by the fleet itself.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spend {
    /// Messages completed by all stages.
    pub processed_messages: f64,
    /// SQS requests per operation.
    pub sqs_requests: BTreeMap<String, f64>,
    /// All SQS requests per processed message.
    pub sqs_requests_per_message: f64,
    /// ReceiveMessage + DeleteMessageBatch per processed message (target ≤ 0.25 with a backlog).
    pub receive_delete_requests_per_message: f64,
    /// The same, over the order phase only.
    pub receive_delete_requests_per_message_order_phase: f64,
    /// The same at steady state: between 10% and 90% of the order phase's messages, from the
    /// once-a-second scrapes (ramp-up, the drained tail and idle long polls excluded).
    pub receive_delete_requests_per_message_steady: f64,
    /// Per queue: (receives, of which empty, messages per non-empty receive).
    pub receives_by_queue: BTreeMap<String, (f64, f64, f64)>,
    /// DynamoDB requests per operation.
    pub dynamodb_requests: BTreeMap<String, f64>,
    /// DynamoDB write requests per message handled by each stage.
    pub dynamodb_writes_per_message_by_stage: BTreeMap<String, f64>,
    /// DynamoDB write units per message handled by each stage (a transaction costs two per
    /// item).
    pub dynamodb_write_units_per_message_by_stage: BTreeMap<String, f64>,
    /// The same by purpose (`effect`, `idempotency`, `history`; see `workers::store::WriteUnits`).
    pub dynamodb_write_units_per_message_by_stage_and_purpose:
        BTreeMap<String, BTreeMap<String, f64>>,
    /// DynamoDB write units per order submitted, by purpose, all stages.
    pub dynamodb_write_units_per_order_by_purpose: BTreeMap<String, f64>,
    /// DynamoDB write units per processed message, all stages.
    pub dynamodb_write_units_per_message: f64,
    /// DynamoDB write requests per processed message, all stages.
    pub dynamodb_writes_per_message: f64,
    /// DynamoDB read requests per processed message.
    pub dynamodb_reads_per_message: f64,
}

/// The run's report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Run id (also the suffix of its queues and tables locally).
    pub run_id: String,
    /// When it started.
    pub started_at: String,
    /// `local emulators` or `aws`.
    pub target: String,
    /// `PASS` or `FAIL`.
    pub verdict: String,
    /// Why it failed.
    pub offenders: Vec<String>,
    /// The load.
    pub scenario: serde_json::Value,
    /// The audit.
    pub audit: serde_json::Value,
    /// Messages waiting when the fleet started (backlog mode).
    pub backlog_before_start: u64,
    /// Wall time of the whole run, seconds.
    pub elapsed_secs: f64,
    /// Wall time of the order phase (until every queue drained), seconds.
    pub order_phase_secs: f64,
    /// Completed messages per second, whole run.
    pub messages_per_sec: f64,
    /// Completed messages per second at steady state (median of the busy seconds).
    pub steady_messages_per_sec: f64,
    /// Orders per second through the order phase.
    pub orders_per_sec: f64,
    /// Enqueue → the order's final state (accepted and packed, unpackable, or rejected).
    pub latency: Latency,
    /// The same by span, from each order's history: enqueue → the orders stage's decision,
    /// that decision → the warehouse's, the warehouse's → delivery taking the order over.
    pub latency_by_stage: BTreeMap<String, Latency>,
    /// When each phase of the run began, seconds on the series' clock.
    pub phases: Vec<(String, f64)>,
    /// Counted requests.
    pub spend: Option<Spend>,
    /// The fleet process, when the harness ran it.
    pub worker: Option<serde_json::Value>,
    /// The flash sale, when the run was one (`--flash-share`).
    pub flash: Option<crate::flash::FlashReport>,
    /// Backend ceilings.
    pub ceiling: Option<Bound>,
    /// A million orders at list prices, from the counted requests (USD).
    pub cost_per_million_orders: Option<serde_json::Value>,
    /// Once a second.
    pub series: Vec<Sample>,
    #[serde(skip)]
    orders: usize,
    /// Per latency span: (quantile, ms) points, HdrHistogram style, and the maximum.
    #[serde(skip)]
    latency_curves: Vec<charts::Curve>,
}

/// The percentiles of a histogram of milliseconds.
fn latency_of(h: &Histogram<u64>) -> Latency {
    Latency {
        count: h.len(),
        p50_ms: h.value_at_quantile(0.5),
        p90_ms: h.value_at_quantile(0.9),
        p99_ms: h.value_at_quantile(0.99),
        max_ms: h.max(),
    }
}

fn round(x: f64) -> f64 {
    // `+ 0.0`: an empty sum is -0.0, printed "-0.0".
    (x * 1000.0).round() / 1000.0 + 0.0
}

impl Report {
    pub(crate) fn new(tag: &str, local: bool, opts: &Options, scenario: &Scenario) -> Self {
        let pace = match opts.pace {
            Pace::Open(r) => serde_json::json!({"mode": "open", "orders_per_sec": r.get()}),
            Pace::Closed(p) => serde_json::json!({"mode": "closed", "producers": p}),
        };
        Self {
            run_id: tag.to_owned(),
            started_at: OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            target: if local {
                "local emulators".into()
            } else {
                "aws".into()
            },
            scenario: serde_json::json!({
                "orders": opts.orders, "mix": opts.mix, "pace": pace, "backlog": opts.backlog,
                "submissions": scenario.submissions.len(), "carrier_events": if opts.carrier_events { scenario.carrier_events.len() } else { 0 },
                "fleet_overrides": opts.fleet_overrides.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            }),
            orders: opts.orders,
            ..Self::default()
        }
    }

    pub(crate) fn set_ceilings(
        &mut self,
        sqs: Ceiling,
        dynamodb: Ceiling,
        dynamodb_workload: Option<Ceiling>,
    ) {
        self.ceiling = Some(Bound {
            sqs,
            dynamodb,
            dynamodb_workload,
            ..Bound::default()
        });
    }

    pub(crate) fn set_latency<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a OrderRecord>,
        sent: &BTreeMap<String, OffsetDateTime>,
    ) {
        let histogram = || Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).expect("bounds");
        let (mut whole, mut spans) = (histogram(), [histogram(), histogram(), histogram()]);
        let record = |h: &mut Histogram<u64>, from: OffsetDateTime, to: OffsetDateTime| {
            let ms = (to - from).whole_milliseconds().clamp(1, 3_600_000) as u64;
            let _ = h.record(ms);
        };
        for r in records {
            let Some(&at) = sent.get(&r.order_id) else {
                continue;
            };
            // The first entry each stage wrote.
            let stage_at = |stage: &str| {
                r.history
                    .iter()
                    .filter(|e| e.stage == stage)
                    .find_map(|e| OffsetDateTime::parse(&e.at, &Rfc3339).ok())
            };
            let done = r
                .history
                .iter()
                .filter(|e| e.stage != "delivery")
                .filter_map(|e| OffsetDateTime::parse(&e.at, &Rfc3339).ok())
                .max();
            if let Some(done) = done {
                record(&mut whole, at, done);
            }
            let (orders, warehouse, delivery) = (
                stage_at("orders"),
                stage_at("warehouse"),
                stage_at("delivery"),
            );
            let steps = [
                (Some(at), orders),
                (orders, warehouse),
                (warehouse, delivery),
            ];
            for (h, step) in spans.iter_mut().zip(steps) {
                if let (Some(from), Some(to)) = step {
                    record(h, from, to);
                }
            }
        }
        let names = [
            "enqueue → orders decided",
            "orders → warehouse decided",
            "warehouse → delivery took over",
        ];
        self.latency = latency_of(&whole);
        self.latency_by_stage = names
            .iter()
            .zip(&spans)
            .filter(|(_, h)| !h.is_empty())
            .map(|(name, h)| ((*name).to_owned(), latency_of(h)))
            .collect();
        self.latency_curves = std::iter::once(("enqueue → final state", &whole))
            .chain(names.into_iter().zip(&spans))
            .filter(|(_, h)| !h.is_empty())
            .map(|(name, h)| {
                let points = h
                    .iter_quantiles(4)
                    .map(|v| {
                        (
                            v.quantile_iterated_to(),
                            h.highest_equivalent(v.value_iterated_to()) as f64,
                        )
                    })
                    .collect();
                (name.to_owned(), points, h.max() as f64)
            })
            .collect();
    }

    pub(crate) fn set_audit(&mut self, audit: &Audit, unexpected_dead_letters: u64) {
        self.audit = serde_json::json!({
            "orders_expected": audit.orders_expected, "orders_completed": audit.orders_completed,
            "orders_rejected": audit.orders_rejected, "lost": audit.lost, "duplicate_effects": audit.duplicate_effects,
            "unexpected_orders": audit.unexpected_orders, "unexpected_dead_letters": unexpected_dead_letters,
        });
        self.offenders = audit.offenders.clone();
        if unexpected_dead_letters > 0 {
            self.offenders.push(format!("{unexpected_dead_letters} dead letters differ from the expected (queue, reason) counts"));
        }
        let pass = audit.lost == 0
            && audit.duplicate_effects == 0
            && audit.unexpected_orders == 0
            && unexpected_dead_letters == 0;
        self.verdict = if pass { "PASS" } else { "FAIL" }.into();
    }

    /// The flash sale's figures; oversell (or stock taken for nothing) fails the run.
    pub(crate) fn set_flash(&mut self, flash: crate::flash::FlashReport) {
        if flash.oversell_units != 0 {
            self.offenders.push(format!(
                "hot products' stock is off by {} units: {:?} (before, after, packed)",
                flash.oversell_units, flash.stock
            ));
            self.verdict = "FAIL".into();
        }
        self.flash = Some(flash);
    }

    pub(crate) fn set_load(
        &mut self,
        elapsed: Duration,
        phase1: Duration,
        series: Vec<Sample>,
        after_orders: Option<&Metrics>,
        end: Option<&Metrics>,
        process: Option<ProcessSample>,
    ) {
        self.elapsed_secs = round(elapsed.as_secs_f64());
        self.order_phase_secs = round(phase1.as_secs_f64());
        self.orders_per_sec = round(self.orders as f64 / phase1.as_secs_f64().max(0.001));
        let mut busy: Vec<f64> = series
            .iter()
            .map(|s| s.processed_per_sec)
            .filter(|r| *r > 0.0)
            .collect();
        busy.sort_by(f64::total_cmp);
        self.steady_messages_per_sec = round(busy.get(busy.len() / 2).copied().unwrap_or(0.0));
        if let Some(m) = end {
            let (mut spend, totals) = spend_of(m);
            spend.dynamodb_write_units_per_order_by_purpose = units_by_purpose(m)
                .into_iter()
                .map(|(purpose, units)| (purpose, round(units / self.orders.max(1) as f64)))
                .collect();
            self.messages_per_sec =
                round(spend.processed_messages / elapsed.as_secs_f64().max(0.001));
            if let Some(a) = after_orders {
                order_phase_spend(a, &series, &mut spend);
            }
            self.cost_per_million_orders = Some(cost_per_million_orders(&totals, self.orders));
            if let Some(b) = &mut self.ceiling {
                b.set_bounds(&spend, self.steady_messages_per_sec);
            }
            self.spend = Some(spend);
        }
        if let Some(p) = process {
            let processed = self
                .spend
                .as_ref()
                .map_or(0.0, |s| s.processed_messages)
                .max(1.0);
            self.worker = Some(worker_figures(&p, processed, &series));
        }
        self.series = series;
    }

    /// Writes report.json, summary.txt and the charts into `dir`.
    ///
    /// # Errors
    /// File errors.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("summary.txt"), self.summary())?;
        let charts = self.charts();
        for (file, svg) in &charts {
            std::fs::write(dir.join(file), svg)?;
        }
        std::fs::write(dir.join("report.html"), self.html(&charts))?;
        Ok(())
    }

    /// The charts, by file name.
    fn charts(&self) -> Vec<(&'static str, String)> {
        let over_time = |f: &dyn Fn(&Sample) -> Vec<(String, f64)>| {
            let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            for s in &self.series {
                for (name, y) in f(s) {
                    series.entry(name).or_default().push((s.t_secs, y));
                }
            }
            series.into_iter().collect::<Vec<_>>()
        };
        let mut throughput = over_time(&|s| {
            s.stages_per_sec
                .iter()
                .map(|(q, r)| (q.clone(), *r))
                .collect()
        });
        throughput.insert(
            0,
            (
                "all stages".to_owned(),
                self.series
                    .iter()
                    .map(|s| (s.t_secs, s.processed_per_sec))
                    .collect(),
            ),
        );
        let bounds = self
            .ceiling
            .iter()
            .map(|b| {
                (
                    format!("bound ({})", b.bounding_backend),
                    b.sqs_bound_messages_per_sec
                        .min(b.dynamodb_bound_messages_per_sec),
                )
            })
            .filter(|(_, bound)| *bound > 0.0)
            .collect();
        let throughput = charts::lines(&charts::Lines {
            title: "Throughput: messages completed per second, by stage".into(),
            x_label: "seconds".into(),
            y_label: "messages/s".into(),
            series: throughput,
            bounds,
            marks: self.phases.clone(),
            clip_peaks: true,
        });
        let backlog = charts::lines(&charts::Lines {
            title: "Backlog: messages visible or in flight, by queue".into(),
            x_label: "seconds".into(),
            y_label: "messages".into(),
            series: over_time(&|s| {
                s.backlog_by_queue
                    .iter()
                    .map(|(q, n)| (q.clone(), *n as f64))
                    .collect()
            }),
            marks: self.phases.clone(),
            ..charts::Lines::default()
        });
        let memory = charts::lines(&charts::Lines {
            title: "Worker resident memory against messages processed".into(),
            x_label: "messages processed".into(),
            y_label: "MiB".into(),
            series: vec![(
                "RSS".into(),
                self.series
                    .iter()
                    .filter(|s| s.rss_mib > 0.0)
                    .map(|s| (s.processed_total, s.rss_mib))
                    .collect(),
            )],
            ..charts::Lines::default()
        });
        let latency = charts::percentiles(&charts::Percentiles {
            title: "Latency by percentile".into(),
            series: self.latency_curves.clone(),
        });
        vec![
            ("throughput.svg", throughput),
            ("backlog.svg", backlog),
            ("latency.svg", latency),
            ("memory.svg", memory),
        ]
    }

    /// One self-contained page: the figures that matter as a table, the charts, the summary.
    fn html(&self, charts: &[(&'static str, String)]) -> String {
        let escape = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let mut rows: Vec<(String, String)> = vec![
            ("verdict".into(), self.verdict.clone()),
            ("target".into(), self.target.clone()),
            ("audit".into(), self.audit.to_string()),
            (
                "throughput".into(),
                format!(
                    "{:.1} msg/s overall, {:.1} steady, {:.1} orders/s",
                    self.messages_per_sec, self.steady_messages_per_sec, self.orders_per_sec
                ),
            ),
        ];
        let latency = |l: &Latency| {
            format!(
                "p50 {} ms, p90 {} ms, p99 {} ms, max {} ms ({} orders)",
                l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.count
            )
        };
        rows.push((
            "latency enqueue → final state".into(),
            latency(&self.latency),
        ));
        for (span, l) in &self.latency_by_stage {
            rows.push((format!("latency {span}"), latency(l)));
        }
        if let Some(sp) = &self.spend {
            rows.push((
                "receive + delete requests per message".into(),
                format!(
                    "{:.3} at steady state, {:.3} over the run",
                    sp.receive_delete_requests_per_message_steady,
                    sp.receive_delete_requests_per_message
                ),
            ));
            rows.push((
                "DynamoDB write units per order, by purpose".into(),
                format!("{:?}", sp.dynamodb_write_units_per_order_by_purpose),
            ));
        }
        if let Some(w) = &self.worker {
            rows.push(("worker".into(), w.to_string()));
        }
        if let Some(c) = &self.cost_per_million_orders {
            rows.push((
                "cost of a million orders (USD)".into(),
                c["total_usd"].to_string(),
            ));
        }
        let table: String = rows
            .iter()
            .map(|(k, v)| format!("<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v)))
            .collect();
        let figures: String = charts
            .iter()
            .map(|(_, svg)| format!("<figure>{svg}</figure>"))
            .collect();
        format!(
            r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Load test {id}</title><style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}table{{border-collapse:collapse;width:100%}}th,td{{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top;font-size:14px}}th{{width:30%;background:#f6f6f6}}figure{{margin:1.5em 0}}pre{{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:12px}}</style></head><body><h1>Load test {id}: {verdict}</h1><table>{table}</table>{figures}<h2>Summary</h2><pre>{summary}</pre></body></html>"#,
            id = escape(&self.run_id),
            verdict = escape(&self.verdict),
            summary = escape(&self.summary()),
        )
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "load test {} against {}: {}\n",
            self.run_id, self.target, self.verdict
        );
        s += &format!("  audit: {}\n", self.audit);
        s += &format!(
            "  throughput: {:.1} msg/s overall, {:.1} msg/s steady, {:.1} orders/s; order phase {:.1} s, whole run {:.1} s\n",
            self.messages_per_sec, self.steady_messages_per_sec, self.orders_per_sec, self.order_phase_secs, self.elapsed_secs
        );
        let l = &self.latency;
        s += &format!("  latency enqueue→final state ({} orders): p50 {} ms, p90 {} ms, p99 {} ms, max {} ms\n", l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms);
        if let Some(sp) = &self.spend {
            s += &format!(
                "  SQS: {:.3} requests/msg; receive+delete {:.3}/msg over the run, {:.3} over the order phase, {:.3} at steady state (target ≤ 0.25 with a backlog)\n",
                sp.sqs_requests_per_message, sp.receive_delete_requests_per_message, sp.receive_delete_requests_per_message_order_phase, sp.receive_delete_requests_per_message_steady
            );
            s += &format!(
                "  DynamoDB: {:.3} write requests/msg ({:.3} write units), {:.3} reads/msg; by stage, write requests {:?}, write units {:?}\n",
                sp.dynamodb_writes_per_message,
                sp.dynamodb_write_units_per_message,
                sp.dynamodb_reads_per_message,
                sp.dynamodb_writes_per_message_by_stage,
                sp.dynamodb_write_units_per_message_by_stage
            );
            s += &format!(
                "  write units by purpose: per order {:?}; per message by stage {:?}\n",
                sp.dynamodb_write_units_per_order_by_purpose,
                sp.dynamodb_write_units_per_message_by_stage_and_purpose
            );
        } else {
            s += "  requests: not measured (the fleet ran outside the harness)\n";
        }
        if let Some(w) = &self.worker {
            s += &format!("  worker: {w}\n");
        }
        if let Some(f) = &self.flash {
            s += &format!("  {}\n", f.summary());
        }
        if let Some(b) = &self.ceiling {
            s += &format!(
                "  ceilings: SQS {:.0} req/s ({:.0} msg/s at the fleet's SQS requests/msg); DynamoDB {:.0} conditional puts/s ({:.0} msg/s if every request cost a put){}\n  → fleet bound {:.0} msg/s by {}; the fleet reached {:.1}% of it\n",
                b.sqs.requests_per_sec, b.sqs_bound_messages_per_sec, b.dynamodb.requests_per_sec,
                b.dynamodb_simple_put_bound_messages_per_sec,
                b.dynamodb_workload.map_or(String::new(), |w| format!(", the fleet's own DynamoDB work without queues {:.0} msg/s", w.units_per_sec)),
                b.sqs_bound_messages_per_sec.min(b.dynamodb_bound_messages_per_sec), b.bounding_backend, b.fleet_percent_of_bound
            );
        }
        if let Some(c) = &self.cost_per_million_orders {
            s += &format!(
                "  cost of a million orders: ${} (SQS ${}, DynamoDB writes ${}, reads ${})\n",
                c["total_usd"], c["sqs_usd"], c["dynamodb_writes_usd"], c["dynamodb_reads_usd"]
            );
        }
        for o in self.offenders.iter().take(20) {
            s += &format!("  offender: {o}\n");
        }
        s
    }
}

/// Memory counts as flat when it grows by at most this much per 1,000 messages after warm-up
/// (8 MiB over a million messages); a falling RSS is flat.
pub const FLAT_KIB_PER_1000_MESSAGES: f64 = 8.0;

/// Fewer messages than this give a slope but no `memory_flat` verdict (warm-up dominates).
pub const MIN_MESSAGES_FOR_MEMORY_VERDICT: f64 = 10_000.0;

/// How the worker's RSS moves with the messages it processes, in KiB per 1,000 messages: the
/// least-squares slope of RSS against messages processed, over the samples between 20% and 95%
/// of the run's messages (allocator and connection-pool warm-up, and the drained tail, left
/// out). `None` when fewer than 10 samples fall in that window.
pub fn rss_slope_after_warmup(series: &[Sample]) -> Option<f64> {
    let total = series.last()?.processed_total;
    let points: Vec<(f64, f64)> = series
        .iter()
        .filter(|s| s.rss_mib > 0.0)
        .filter(|s| s.processed_total >= 0.2 * total && s.processed_total <= 0.95 * total)
        .map(|s| (s.processed_total, s.rss_mib))
        .collect();
    if points.len() < 10 {
        return None;
    }
    Some(least_squares_slope(&points)? * 1000.0 * 1024.0)
}

/// The least-squares slope of `y` over `x`; `None` with fewer than two distinct `x`.
pub fn least_squares_slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if n < 2.0 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    Some(sxy / sxx)
}

/// Request totals of a run, for its cost.
struct Totals {
    sqs_requests: f64,
    write_units: f64,
    reads: f64,
}

/// Requests of `service` by operation, from the workers' counters.
fn aws_requests(m: &Metrics, service: &str) -> BTreeMap<String, f64> {
    m.iter()
        .filter(|(k, _)| {
            k.starts_with("fleet_aws_requests_total{")
                && k.contains(&format!("service=\"{service}\""))
        })
        .filter_map(|(k, v)| {
            Some((
                k.split("operation=\"")
                    .nth(1)?
                    .split('"')
                    .next()?
                    .to_owned(),
                *v,
            ))
        })
        .fold(BTreeMap::new(), |mut acc, (op, v)| {
            *acc.entry(op).or_insert(0.0) += v;
            acc
        })
}

/// What the run spent per message, from the workers' counters at its end.
fn spend_of(m: &Metrics) -> (Spend, Totals) {
    let processed = probe::sum(m, "fleet_messages_succeeded_total", &[]);
    let sqs = aws_requests(m, "sqs");
    let ddb = aws_requests(m, "dynamodb");
    let per = |n: f64| {
        if processed > 0.0 {
            round(n / processed)
        } else {
            0.0
        }
    };
    let get = |map: &BTreeMap<String, f64>, op: &str| map.get(op).copied().unwrap_or(0.0);
    let writes: f64 = DYNAMODB_WRITE_OPERATIONS
        .iter()
        .map(|op| get(&ddb, op))
        .sum();
    let reads: f64 = DYNAMODB_READ_OPERATIONS
        .iter()
        .map(|op| get(&ddb, op))
        .sum();
    let write_units = probe::sum(m, "fleet_ddb_write_units_total", &[]);
    let (by_stage, units_by_stage, units_by_purpose) = writes_by_stage(m);
    let spend = Spend {
        processed_messages: processed,
        sqs_requests_per_message: per(sqs.values().sum()),
        receive_delete_requests_per_message: per(
            get(&sqs, "ReceiveMessage") + get(&sqs, "DeleteMessageBatch")
        ),
        dynamodb_writes_per_message: per(writes),
        dynamodb_reads_per_message: per(reads),
        dynamodb_writes_per_message_by_stage: by_stage,
        dynamodb_write_units_per_message_by_stage: units_by_stage,
        dynamodb_write_units_per_message_by_stage_and_purpose: units_by_purpose,
        dynamodb_write_units_per_message: per(write_units),
        receives_by_queue: receives_by_queue(m),
        sqs_requests: sqs.clone(),
        dynamodb_requests: ddb,
        ..Spend::default()
    };
    let totals = Totals {
        sqs_requests: sqs.values().sum(),
        write_units,
        reads,
    };
    (spend, totals)
}

/// Write units by purpose, all stages.
fn units_by_purpose(m: &Metrics) -> BTreeMap<String, f64> {
    probe::label_values(m, "fleet_ddb_write_units_total", "purpose")
        .into_iter()
        .map(|purpose| {
            let label = format!("purpose=\"{purpose}\"");
            let units = probe::sum(m, "fleet_ddb_write_units_total", &[&label]);
            (purpose, units)
        })
        .collect()
}

/// Write requests, write units, and write units by purpose per message handled, by stage.
type StageWrites = (
    BTreeMap<String, f64>,
    BTreeMap<String, f64>,
    BTreeMap<String, BTreeMap<String, f64>>,
);

/// DynamoDB write requests and write units per message handled, by stage (and by purpose).
fn writes_by_stage(m: &Metrics) -> StageWrites {
    let mut by_stage = BTreeMap::new();
    let mut units_by_stage = BTreeMap::new();
    let mut units_by_purpose = BTreeMap::new();
    for stage in probe::label_values(m, "fleet_ddb_write_requests_total", "stage") {
        let stage = stage.as_str();
        let label = format!("stage=\"{stage}\"");
        let stage_writes = probe::sum(m, "fleet_ddb_write_requests_total", &[&label]);
        let queue = match stage {
            "ingestion" => "ingest",
            other => other,
        };
        let queue = format!("queue=\"fleet-{queue}");
        let handled = probe::sum(m, "fleet_messages_succeeded_total", &[&queue])
            + probe::sum(m, "fleet_messages_dead_lettered_total", &[&queue]);
        let stage_units = probe::sum(m, "fleet_ddb_write_units_total", &[&label]);
        let per_handled = |n: f64| {
            if handled > 0.0 {
                round(n / handled)
            } else {
                0.0
            }
        };
        by_stage.insert(stage.to_owned(), per_handled(stage_writes));
        units_by_stage.insert(stage.to_owned(), per_handled(stage_units));
        let purposes: BTreeMap<String, f64> =
            probe::label_values(m, "fleet_ddb_write_units_total", "purpose")
                .into_iter()
                .map(|purpose| {
                    let p = format!("purpose=\"{purpose}\"");
                    let units = probe::sum(m, "fleet_ddb_write_units_total", &[&label, &p]);
                    (purpose, per_handled(units))
                })
                .collect();
        units_by_purpose.insert(stage.to_owned(), purposes);
    }
    (by_stage, units_by_stage, units_by_purpose)
}

/// Receives by queue: (all, empty, messages per non-empty receive).
fn receives_by_queue(m: &Metrics) -> BTreeMap<String, (f64, f64, f64)> {
    let mut out = BTreeMap::new();
    for queue in probe::label_values(m, "fleet_receives_total", "queue") {
        let q = format!("queue=\"{queue}\"");
        let all = probe::sum(m, "fleet_receives_total", &[&q]);
        let empty = probe::sum(m, "fleet_receives_total", &[&q, "empty=\"true\""]);
        let received = probe::sum(m, "fleet_messages_received_total", &[&q]);
        let per_receive = if all > empty {
            round(received / (all - empty))
        } else {
            0.0
        };
        out.insert(queue.to_owned(), (all, empty, per_receive));
    }
    out
}

/// Receive and delete requests per message during the order phase (`a`: the counters when it
/// ended), and at steady state (between 10 % and 90 % of its messages).
fn order_phase_spend(a: &Metrics, series: &[Sample], spend: &mut Spend) {
    let p = probe::sum(a, "fleet_messages_succeeded_total", &[]);
    let rd = probe::sum(
        a,
        "fleet_aws_requests_total",
        &["operation=\"ReceiveMessage\""],
    ) + probe::sum(
        a,
        "fleet_aws_requests_total",
        &["operation=\"DeleteMessageBatch\""],
    );
    spend.receive_delete_requests_per_message_order_phase =
        if p > 0.0 { round(rd / p) } else { 0.0 };
    let at = |frac: f64| {
        series
            .iter()
            .find(|s| s.processed_total >= frac * p && s.receive_delete_total > 0.0)
    };
    if let (Some(a), Some(b)) = (at(0.1), at(0.9)) {
        let dp = b.processed_total - a.processed_total;
        if dp > 0.0 {
            spend.receive_delete_requests_per_message_steady =
                round((b.receive_delete_total - a.receive_delete_total) / dp);
        }
    }
}

/// Cost of a million orders: units per order × price. Write units are the workers' own count
/// (one per started KB of the item written, twice that per item of a transaction); reads are
/// one unit per request.
fn cost_per_million_orders(totals: &Totals, orders: usize) -> serde_json::Value {
    let per_order = |n: f64| n / orders.max(1) as f64;
    let sqs_cost = per_order(totals.sqs_requests) * SQS_PER_MILLION_REQUESTS;
    let write_cost = per_order(totals.write_units) * DDB_PER_MILLION_WRITE_UNITS;
    let read_cost = per_order(totals.reads) * DDB_PER_MILLION_READ_UNITS;
    serde_json::json!({
        "sqs_usd": round(sqs_cost), "dynamodb_writes_usd": round(write_cost), "dynamodb_reads_usd": round(read_cost),
        "total_usd": round(sqs_cost + write_cost + read_cost),
        "prices": {"sqs_per_million_requests": SQS_PER_MILLION_REQUESTS, "dynamodb_per_million_wru": DDB_PER_MILLION_WRITE_UNITS, "dynamodb_per_million_rru": DDB_PER_MILLION_READ_UNITS},
        "note": "SQS standard and DynamoDB on-demand list prices (us-east-1); write units as the workers count them (one per started KB of the item written, twice per transaction item), one read unit per read request; compute (Fargate) not included",
    })
}

/// The worker process's CPU and memory figures, with the memory verdict.
fn worker_figures(p: &ProcessSample, processed: f64, series: &[Sample]) -> serde_json::Value {
    let rss: Vec<f64> = series
        .iter()
        .map(|s| s.rss_mib)
        .filter(|r| *r > 0.0)
        .collect();
    let third = (rss.len() / 3).max(1);
    let mean = |xs: &[f64]| {
        if xs.is_empty() {
            0.0
        } else {
            xs.iter().sum::<f64>() / xs.len() as f64
        }
    };
    let first = mean(&rss[..third.min(rss.len())]);
    let last = mean(&rss[rss.len().saturating_sub(third)..]);
    let slope = rss_slope_after_warmup(series);
    serde_json::json!({
        "cpu_secs": round(p.cpu_secs),
        "cpu_ms_per_1000_messages": round(p.cpu_secs * 1000.0 / processed * 1000.0),
        "peak_rss_mib": round(p.peak_rss_mib),
        "rss_mib_first_third_mean": round(first),
        "rss_mib_last_third_mean": round(last),
        "rss_growth_mib": round(last - first),
        "rss_kib_per_1000_messages_after_warmup": slope.map(round),
        // A verdict needs enough messages past warm-up to see a slope in.
        "memory_flat": slope
            .filter(|_| processed >= MIN_MESSAGES_FOR_MEMORY_VERDICT)
            .map(memory_flat),
    })
}

/// The memory verdict on a slope (KiB per 1,000 messages after warm-up).
fn memory_flat(kib_per_1000: f64) -> bool {
    kib_per_1000 <= FLAT_KIB_PER_1000_MESSAGES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_calls_45_kib_per_1000_messages_growth_and_a_fall_flat() {
        // The pipeline's slope before the EMF registry stopped keeping every sample.
        assert!(!memory_flat(45.0));
        assert!(memory_flat(4.9));
        assert!(
            memory_flat(-15.9),
            "RSS that falls after warm-up is not a leak"
        );
    }

    fn run(rss: impl Fn(f64) -> f64) -> Vec<Sample> {
        (0..=100)
            .map(|i| {
                let processed = f64::from(i) * 100.0;
                Sample {
                    t_secs: f64::from(i),
                    processed_total: processed,
                    rss_mib: rss(processed),
                    ..Sample::default()
                }
            })
            .collect()
    }

    #[test]
    fn warm_up_does_not_count_as_growth_but_steady_growth_does() {
        // 10 MiB of warm-up over the first 10% of messages, then flat.
        let warm = run(|m| if m < 1_000.0 { 20.0 + m / 100.0 } else { 30.0 });
        let slope = rss_slope_after_warmup(&warm).unwrap();
        assert!(slope.abs() < 0.001, "{slope}");

        // 1 MiB more per 1,000 messages: a leak.
        let leak = run(|m| 30.0 + m / 1_000.0);
        let slope = rss_slope_after_warmup(&leak).unwrap();
        assert!((slope - 1024.0).abs() < 0.01, "{slope}");
        assert!(slope > FLAT_KIB_PER_1000_MESSAGES);
    }

    #[test]
    fn too_few_samples_give_no_verdict() {
        assert_eq!(rss_slope_after_warmup(&run(|_| 30.0)[..5]), None);
        assert_eq!(rss_slope_after_warmup(&[]), None);
    }
}
