//! Autoscaling, simulated (`loadtest --simulate-scaling`): one role's queue under a sale's
//! traffic curve (ramp to a multiple of today's rate, hold, fall), scaled by the deploy
//! template's target-tracking policy, second by second. It shows the tasks over time, the
//! backlog, the age of the oldest message, when each alarm fires and what an hour costs, and
//! which limit binds first: the task cap, DynamoDB (the table's throughput, or one hot item), or
//! SQS's in-flight limit. The inputs are the per-task rate `loadtest` measures and the template's
//! parameters; what the model leaves out is said where it is made.

use std::collections::VecDeque;

use serde::Serialize;

/// The deploy template's scaling policy and alarms (deploy/fleet.yaml), and the platform's
/// reaction times.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Policy {
    /// `MinTasksPerRole`.
    pub min_tasks: u32,
    /// `MaxTasksPerRole`: the denial-of-wallet cap.
    pub max_tasks: u32,
    /// `BacklogPerTaskTarget`: visible messages per running task.
    pub backlog_per_task: f64,
    /// Target tracking's scale-out cooldown, seconds.
    pub scale_out_cooldown_secs: u32,
    /// Target tracking's scale-in cooldown, seconds.
    pub scale_in_cooldown_secs: u32,
    /// Seconds from a new desired count to a task polling (Fargate pull and start; assumed).
    pub task_start_secs: u32,
    /// `OldestMessageAlarmSecs`.
    pub oldest_alarm_secs: f64,
    /// `QueueDepthAlarm`.
    pub depth_alarm: f64,
    /// Messages one task holds at most (`max_in_flight`).
    pub in_flight_per_task: u32,
    /// Scale on messages sent a second per task (this target) instead of visible messages per
    /// task: the backlog reads zero while the tasks keep up, so a backlog target scales in
    /// during a sale's peak and lets the backlog build again; arrivals do not fall until the
    /// traffic does.
    pub arrivals_per_task: Option<f64>,
}

impl Default for Policy {
    /// The template's defaults.
    fn default() -> Self {
        Self {
            min_tasks: 1,
            max_tasks: 10,
            backlog_per_task: 500.0,
            scale_out_cooldown_secs: 30,
            scale_in_cooldown_secs: 120,
            task_start_secs: 60,
            oldest_alarm_secs: 600.0,
            depth_alarm: 10_000.0,
            in_flight_per_task: 32,
            arrivals_per_task: None,
        }
    }
}

/// What the fleet and its backends can do.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Capacity {
    /// Messages a second one task of the role drains (measured by `loadtest`).
    pub per_task_rate: f64,
    /// Messages a second DynamoDB allows this role: the table's write quota over the role's
    /// write units per message, and a hot item's bound in a sale.
    pub dynamodb_rate: f64,
    /// SQS's in-flight limit on a standard queue.
    pub sqs_in_flight: u32,
    /// Seconds a message is in flight (receive to delete), for the in-flight bound.
    pub message_secs: f64,
}

/// A sale's traffic: today's rate, then a ramp to `multiple` times it, a hold and a fall.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Traffic {
    /// Messages a second to the role today.
    pub base_rate: f64,
    /// The peak over today.
    pub multiple: f64,
    /// Seconds at today's rate before the ramp.
    pub before_secs: u32,
    /// Seconds of the ramp up (and of the fall).
    pub ramp_secs: u32,
    /// Seconds at the peak.
    pub hold_secs: u32,
    /// Seconds after the fall.
    pub after_secs: u32,
}

impl Traffic {
    /// Arrivals a second at second `t`.
    pub fn rate(&self, t: u32) -> f64 {
        let peak = self.base_rate * self.multiple;
        let (up, hold, down) = (
            self.before_secs,
            self.before_secs + self.ramp_secs,
            self.before_secs + self.ramp_secs + self.hold_secs,
        );
        let ramp = f64::from(self.ramp_secs.max(1));
        if t < up {
            self.base_rate
        } else if t < hold {
            self.base_rate + (peak - self.base_rate) * f64::from(t - up) / ramp
        } else if t < down {
            peak
        } else if t < down + self.ramp_secs {
            peak - (peak - self.base_rate) * f64::from(t - down) / ramp
        } else {
            self.base_rate
        }
    }

    /// The whole curve's length, seconds.
    pub fn secs(&self) -> u32 {
        self.before_secs + 2 * self.ramp_secs + self.hold_secs + self.after_secs
    }
}

/// One second of the simulation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Second {
    /// Seconds since the start.
    pub t: u32,
    /// Arrivals this second.
    pub arrivals: f64,
    /// Tasks polling.
    pub tasks: u32,
    /// Messages waiting (visible).
    pub backlog: f64,
    /// Age of the oldest waiting message, seconds.
    pub oldest_secs: f64,
    /// Messages handled this second.
    pub served: f64,
    /// What bound `served`: `arrivals`, `task_cap` (the running tasks at the cap), `scaling`
    /// (fewer tasks than the cap: scaling has not caught up), `dynamodb` or `sqs_in_flight`.
    pub bound: &'static str,
}

/// The simulation's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Every second.
    pub series: Vec<Second>,
    /// Most tasks at once.
    pub peak_tasks: u32,
    /// Largest backlog.
    pub peak_backlog: f64,
    /// Oldest message's largest age, seconds.
    pub peak_oldest_secs: f64,
    /// When the oldest-message alarm first fired (seconds), if it did.
    pub oldest_alarm_at: Option<u32>,
    /// When the depth alarm first fired, if it did.
    pub depth_alarm_at: Option<u32>,
    /// Seconds each limit bound the rate while messages waited: (limit, seconds).
    pub bound_secs: Vec<(&'static str, u32)>,
    /// The limit that bound first while messages waited, if any did.
    pub first_bound: Option<&'static str>,
    /// Task-hours over the run.
    pub task_hours: f64,
}

/// Runs the simulation second by second.
///
/// The model: arrivals join a FIFO backlog (the oldest message is the front cohort's age); the
/// running tasks drain `per_task_rate` each, at most what DynamoDB and the in-flight limit
/// allow. Target tracking reads one datapoint a minute (CloudWatch's SQS metrics): three above
/// the target scale out to `tasks × metric / target` (after the scale-out cooldown), fifteen
/// below 90 % of it scale in (after the scale-in cooldown); a new task polls `task_start_secs`
/// later. Left out: metric delay beyond the minute, receive batching, retries and failures.
pub fn simulate(policy: &Policy, capacity: &Capacity, traffic: &Traffic) -> Outcome {
    let tasks = policy.min_tasks.max(1);
    let mut sim = Sim {
        policy,
        capacity,
        tasks,
        desired: tasks,
        starting: VecDeque::new(),
        backlog: VecDeque::new(),
        above: 0,
        below: 0,
        minute_oldest: 0.0,
        minute_depth: 0.0,
        oldest_over: 0,
        depth_over: 0,
        last_out: None,
        last_in: None,
        bound_secs: Default::default(),
        out: Outcome {
            series: Vec::with_capacity(traffic.secs() as usize),
            peak_tasks: tasks,
            peak_backlog: 0.0,
            peak_oldest_secs: 0.0,
            oldest_alarm_at: None,
            depth_alarm_at: None,
            bound_secs: Vec::new(),
            first_bound: None,
            task_hours: 0.0,
        },
    };
    for t in 0..traffic.secs() {
        sim.second(t, traffic.rate(t));
    }
    let mut out = sim.out;
    out.bound_secs = sim.bound_secs.into_iter().collect();
    out
}

/// The simulation's state from one second to the next.
struct Sim<'a> {
    policy: &'a Policy,
    capacity: &'a Capacity,
    tasks: u32,
    desired: u32,
    /// Tasks starting: (ready at, count).
    starting: VecDeque<(u32, u32)>,
    /// The backlog by arrival second: (arrived at, count).
    backlog: VecDeque<(u32, f64)>,
    /// Datapoints in a row above and below the scaling target.
    above: u32,
    below: u32,
    /// This minute's maxima, and minutes in a row over the alarms' thresholds.
    minute_oldest: f64,
    minute_depth: f64,
    oldest_over: u32,
    depth_over: u32,
    last_out: Option<u32>,
    last_in: Option<u32>,
    bound_secs: std::collections::BTreeMap<&'static str, u32>,
    out: Outcome,
}

impl Sim<'_> {
    /// Second `t` with `arrivals`: tasks that are ready join, the backlog is served as far as
    /// the binding limit allows, the alarms and the scaling policy read their minute.
    fn second(&mut self, t: u32, arrivals: f64) {
        while self.starting.front().is_some_and(|(at, _)| *at <= t) {
            self.tasks += self.starting.pop_front().map_or(0, |(_, n)| n);
        }
        self.backlog.push_back((t, arrivals));
        let (served, bound) = self.serve();
        if bound != "arrivals" {
            *self.bound_secs.entry(bound).or_default() += 1;
            self.out.first_bound.get_or_insert(bound);
        }
        let visible: f64 = self.backlog.iter().map(|(_, n)| n).sum();
        let oldest = self
            .backlog
            .iter()
            .find(|(_, n)| *n > 1e-9)
            .map_or(0.0, |(at, _)| f64::from(t - at));
        if t % 60 == 59 {
            self.alarms(t, oldest, visible);
            self.scale(t, arrivals, visible);
        } else {
            self.minute_oldest = self.minute_oldest.max(oldest);
            self.minute_depth = self.minute_depth.max(visible);
        }
        let tasks = self.tasks;
        let out = &mut self.out;
        out.peak_tasks = out.peak_tasks.max(tasks);
        out.peak_backlog = out.peak_backlog.max(visible);
        out.peak_oldest_secs = out.peak_oldest_secs.max(oldest);
        out.task_hours += f64::from(tasks) / 3600.0;
        out.series.push(Second {
            t,
            arrivals,
            tasks,
            backlog: visible,
            oldest_secs: oldest,
            served,
            bound,
        });
    }

    /// Serves the backlog, oldest first, at the lowest of the tasks', DynamoDB's and the
    /// in-flight limit's rates: what was served, and what bound it (`arrivals` when nothing).
    fn serve(&mut self) -> (f64, &'static str) {
        let capacity = self.capacity;
        let waiting: f64 = self.backlog.iter().map(|(_, n)| n).sum();
        let in_flight_rate = f64::from(capacity.sqs_in_flight) / capacity.message_secs.max(1e-3);
        let limits = [
            ("tasks", f64::from(self.tasks) * capacity.per_task_rate),
            ("dynamodb", capacity.dynamodb_rate),
            ("sqs_in_flight", in_flight_rate),
        ];
        let (limit, rate) =
            limits.iter().copied().fold(
                ("arrivals", f64::INFINITY),
                |a, b| if b.1 < a.1 { b } else { a },
            );
        let served = waiting.min(rate);
        // Short of tasks: at the cap, or because scaling has not caught up yet.
        let limit = match limit {
            "tasks" if self.tasks >= self.policy.max_tasks => "task_cap",
            "tasks" => "scaling",
            other => other,
        };
        let bound = if served < waiting { limit } else { "arrivals" };
        let mut left = served;
        while left > 0.0 {
            let Some(front) = self.backlog.front_mut() else {
                break;
            };
            if front.1 <= left {
                left -= front.1;
                self.backlog.pop_front();
            } else {
                front.1 -= left;
                left = 0.0;
            }
        }
        (served, bound)
    }

    /// The alarms read the minute's maximum, and fire after 3 (oldest message) and 5 (depth)
    /// minutes over their threshold in a row, as the template's do.
    fn alarms(&mut self, t: u32, oldest: f64, visible: f64) {
        let minute_oldest = self.minute_oldest.max(oldest);
        let minute_depth = self.minute_depth.max(visible);
        self.oldest_over = if minute_oldest > self.policy.oldest_alarm_secs {
            self.oldest_over + 1
        } else {
            0
        };
        self.depth_over = if minute_depth > self.policy.depth_alarm {
            self.depth_over + 1
        } else {
            0
        };
        if self.oldest_over >= 3 {
            self.out.oldest_alarm_at.get_or_insert(t);
        }
        if self.depth_over >= 5 {
            self.out.depth_alarm_at.get_or_insert(t);
        }
        (self.minute_oldest, self.minute_depth) = (0.0, 0.0);
    }

    /// Target tracking, one datapoint a minute: three above the target scale out (after the
    /// cooldown; the tasks start later), fifteen below 90 % of it scale in.
    fn scale(&mut self, t: u32, arrivals: f64, visible: f64) {
        let policy = self.policy;
        let tasks = self.tasks.max(1);
        let (metric, target) = match policy.arrivals_per_task {
            Some(target) => (arrivals / f64::from(tasks), target),
            None => (visible / f64::from(tasks), policy.backlog_per_task),
        };
        self.above = if metric > target { self.above + 1 } else { 0 };
        self.below = if metric < 0.9 * target {
            self.below + 1
        } else {
            0
        };
        let want = ((f64::from(tasks) * metric / target).ceil() as u32)
            .clamp(policy.min_tasks.max(1), policy.max_tasks);
        let cooled = |last: Option<u32>, secs: u32| last.is_none_or(|l| t - l >= secs);
        if self.above >= 3
            && want > self.desired
            && cooled(self.last_out, policy.scale_out_cooldown_secs)
        {
            self.starting
                .push_back((t + policy.task_start_secs, want - self.desired));
            self.desired = want;
            self.last_out = Some(t);
        } else if self.below >= 15
            && want < self.desired
            && cooled(self.last_in, policy.scale_in_cooldown_secs)
            && self.starting.is_empty()
        {
            self.tasks = self
                .tasks
                .saturating_sub(self.desired - want)
                .max(policy.min_tasks.max(1));
            self.desired = self.tasks;
            self.last_in = Some(t);
        }
    }
}

/// The smallest task cap (and, with it, the backlog target) of `targets` that keeps the oldest
/// message under `max_age_secs` for this traffic; `None` when no cap up to `ceiling` does
/// (another limit binds).
pub fn smallest_policy(
    base: &Policy,
    capacity: &Capacity,
    traffic: &Traffic,
    targets: &[f64],
    ceiling: u32,
    max_age_secs: f64,
) -> Option<Policy> {
    for max_tasks in base.min_tasks.max(1)..=ceiling {
        let backlog = targets.iter().map(|&backlog_per_task| Policy {
            max_tasks,
            backlog_per_task,
            ..*base
        });
        // Or on arrivals, at 70 % of what a task drains.
        let arrivals = std::iter::once(Policy {
            max_tasks,
            arrivals_per_task: Some(0.7 * capacity.per_task_rate),
            ..*base
        });
        for policy in backlog.chain(arrivals) {
            if simulate(&policy, capacity, traffic).peak_oldest_secs < max_age_secs {
                return Some(policy);
            }
        }
    }
    None
}

/// The inputs of `loadtest --simulate-scaling`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Inputs {
    /// Messages a second one task drains.
    pub per_task_rate: f64,
    /// Messages a second to the role today.
    pub base_rate: f64,
    /// DynamoDB write units per message of the role (the warehouse's: the heaviest).
    pub write_units_per_message: f64,
    /// A table's write throughput quota, units a second.
    pub table_write_units: f64,
    /// In a sale: the share of orders on one product (0: no sale).
    pub hot_share: f64,
    /// Items that product's stock is split over.
    pub stock_shards: u32,
    /// Seconds one transaction holds an item (transactions on one item at once conflict).
    pub transaction_secs: f64,
    /// The oldest message's age to stay under, seconds.
    pub target_age_secs: f64,
}

impl Inputs {
    /// Messages a second DynamoDB allows the role: the table's quota over the units per
    /// message, and in a sale the hot item's bounds (1,000 units/s at 2 units per order, one
    /// transaction at a time) times its shards, over the hot share.
    pub fn dynamodb_rate(&self) -> f64 {
        let table = self.table_write_units / self.write_units_per_message.max(1e-9);
        if self.hot_share <= 0.0 {
            return table;
        }
        let per_item = (1_000.0 / 2.0_f64).min(1.0 / self.transaction_secs.max(1e-6));
        table.min(per_item * f64::from(self.stock_shards.max(1)) / self.hot_share)
    }
}

/// One scenario of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    /// Peak over today.
    pub multiple: f64,
    /// With the template's defaults.
    pub defaults: Summary,
    /// The smallest policy that keeps the oldest message under the target age, and its run;
    /// `None` when no task cap up to 200 does.
    pub recommended: Option<(Policy, Summary)>,
}

/// A run in figures.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Most tasks.
    pub peak_tasks: u32,
    /// Largest backlog.
    pub peak_backlog: f64,
    /// Oldest message's largest age.
    pub peak_oldest_secs: f64,
    /// When the oldest-message alarm fired.
    pub oldest_alarm_at: Option<u32>,
    /// When the depth alarm fired.
    pub depth_alarm_at: Option<u32>,
    /// The limit that bound first.
    pub first_bound: Option<&'static str>,
    /// Seconds each limit bound.
    pub bound_secs: Vec<(&'static str, u32)>,
    /// Cost an hour at the peak, for this role only: its tasks (0.25 vCPU, 0.5 GB on Fargate),
    /// its DynamoDB writes and SQS requests at the offered rate.
    pub peak_cost_per_hour: f64,
}

/// Fargate, 0.25 vCPU and 0.5 GB, an hour (us-east-1 list prices).
pub const TASK_PER_HOUR: f64 = 0.25 * 0.040_48 + 0.5 * 0.004_445;

fn summary(o: &Outcome, inputs: &Inputs, peak_rate: f64) -> Summary {
    let dynamodb = peak_rate
        * inputs.write_units_per_message
        * 3_600.0
        * crate::report::DDB_PER_MILLION_WRITE_UNITS
        / 1e6;
    // About 1.25 SQS requests per message (receive, send and delete batches).
    let sqs = peak_rate * 1.25 * 3_600.0 * crate::report::SQS_PER_MILLION_REQUESTS / 1e6;
    Summary {
        peak_tasks: o.peak_tasks,
        peak_backlog: o.peak_backlog,
        peak_oldest_secs: o.peak_oldest_secs,
        oldest_alarm_at: o.oldest_alarm_at,
        depth_alarm_at: o.depth_alarm_at,
        first_bound: o.first_bound,
        bound_secs: o.bound_secs.clone(),
        peak_cost_per_hour: f64::from(o.peak_tasks) * TASK_PER_HOUR + dynamodb + sqs,
    }
}

/// Simulates 10× and 100× of today with the template's defaults, finds the policy that keeps
/// the oldest message under the target age, and writes `scaling.json`, `scaling.md` and the
/// charts (`scaling-tasks.svg`, `scaling-backlog.svg`, `scaling-oldest.svg`) to `dir`.
///
/// # Errors
/// Writing the files.
pub fn report(inputs: &Inputs, dir: &std::path::Path) -> anyhow::Result<Vec<Scenario>> {
    std::fs::create_dir_all(dir)?;
    let policy = Policy::default();
    let capacity = Capacity {
        per_task_rate: inputs.per_task_rate,
        dynamodb_rate: inputs.dynamodb_rate(),
        sqs_in_flight: 120_000,
        message_secs: 1.0,
    };
    let mut md = header(inputs, &policy, &capacity);
    let mut charts = Charts::default();
    let scenarios: Vec<Scenario> = [10.0, 100.0]
        .into_iter()
        .map(|multiple| peak(inputs, &policy, &capacity, multiple, &mut md, &mut charts))
        .collect();
    std::fs::write(dir.join("scaling.md"), md)?;
    std::fs::write(
        dir.join("scaling.json"),
        serde_json::to_string_pretty(&(inputs, &scenarios))?,
    )?;
    let chart = |title: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]| {
        crate::charts::lines(&crate::charts::Lines {
            title: title.into(),
            x_label: "minutes".into(),
            y_label: y_label.into(),
            series: series.to_vec(),
            ..crate::charts::Lines::default()
        })
    };
    std::fs::write(
        dir.join("scaling-tasks.svg"),
        chart("Tasks of the role", "tasks", &charts.tasks),
    )?;
    std::fs::write(
        dir.join("scaling-backlog.svg"),
        chart("Visible messages", "messages", &charts.backlog),
    )?;
    std::fs::write(
        dir.join("scaling-oldest.svg"),
        chart("Age of the oldest message", "seconds", &charts.oldest),
    )?;
    Ok(scenarios)
}

/// The charts' series: (label, points of (minutes, value)).
#[derive(Default)]
struct Charts {
    tasks: Vec<(String, Vec<(f64, f64)>)>,
    backlog: Vec<(String, Vec<(f64, f64)>)>,
    oldest: Vec<(String, Vec<(f64, f64)>)>,
}

/// The report's inputs and the table's header.
fn header(inputs: &Inputs, policy: &Policy, capacity: &Capacity) -> String {
    format!(
        "# Autoscaling, simulated\n\nInputs: {} msg/s per task, today {} msg/s to the role, {} write units per message, DynamoDB allows {:.0} msg/s (hot share {:.0} %, {} stock shards), target age {} s. Template defaults: {} to {} tasks, {} visible messages per task, cooldowns {} s out / {} s in, tasks poll {} s after they are asked for.\n\n| peak | policy | peak tasks | peak backlog | oldest message | oldest alarm | depth alarm | binds first | this role's cost an hour at peak |\n|---|---|---|---|---|---|---|---|---|\n",
        inputs.per_task_rate, inputs.base_rate, inputs.write_units_per_message, capacity.dynamodb_rate,
        inputs.hot_share * 100.0, inputs.stock_shards, inputs.target_age_secs,
        policy.min_tasks, policy.max_tasks, policy.backlog_per_task, policy.scale_out_cooldown_secs,
        policy.scale_in_cooldown_secs, policy.task_start_secs
    )
}

/// A table row: one policy at one peak.
fn row(md: &mut String, multiple: f64, name: &str, s: &Summary) {
    let at = |a: Option<u32>| {
        a.map_or("no".to_owned(), |t| {
            format!("at {:.1} min", f64::from(t) / 60.0)
        })
    };
    md.push_str(&format!(
        "| {multiple}× | {name} | {} | {:.0} | {:.0} s | {} | {} | {} | ${:.2} |\n",
        s.peak_tasks,
        s.peak_backlog,
        s.peak_oldest_secs,
        at(s.oldest_alarm_at),
        at(s.depth_alarm_at),
        s.first_bound.unwrap_or("nothing"),
        s.peak_cost_per_hour
    ));
}

/// Every tenth second of a run, in minutes.
fn points(o: &Outcome, f: fn(&Second) -> f64) -> Vec<(f64, f64)> {
    o.series
        .iter()
        .step_by(10)
        .map(|s| (f64::from(s.t) / 60.0, f(s)))
        .collect()
}

/// One peak (`multiple` × today's rate): the template's defaults, then the smallest task cap
/// that keeps the oldest message under the target, else tasks started before the sale.
fn peak(
    inputs: &Inputs,
    policy: &Policy,
    capacity: &Capacity,
    multiple: f64,
    md: &mut String,
    charts: &mut Charts,
) -> Scenario {
    let traffic = Traffic {
        base_rate: inputs.base_rate,
        multiple,
        before_secs: 300,
        ramp_secs: 300,
        hold_secs: 1_200,
        after_secs: 1_800,
    };
    let peak = inputs.base_rate * multiple;
    let o = simulate(policy, capacity, &traffic);
    let defaults = summary(&o, inputs, peak);
    row(md, multiple, "template defaults", &defaults);
    let label = |what: &str| format!("{multiple}× {what}");
    charts
        .tasks
        .push((label("defaults"), points(&o, |s| f64::from(s.tasks))));
    charts
        .backlog
        .push((label("defaults"), points(&o, |s| s.backlog)));
    charts
        .oldest
        .push((label("defaults"), points(&o, |s| s.oldest_secs)));
    let targets = [policy.backlog_per_task, 300.0, 150.0, 50.0];
    let recommended = smallest_policy(
        policy,
        capacity,
        &traffic,
        &targets,
        200,
        inputs.target_age_secs,
    )
    .map(|p| {
        let o = simulate(&p, capacity, &traffic);
        let s = summary(&o, inputs, peak);
        let name = match p.arrivals_per_task {
            Some(a) => format!(
                "max {} tasks, target {a:.0} msg/s sent per task",
                p.max_tasks
            ),
            None => format!(
                "max {} tasks, target {} visible per task",
                p.max_tasks, p.backlog_per_task
            ),
        };
        row(md, multiple, &name, &s);
        if multiple >= 10.0 {
            charts
                .tasks
                .push((label("recommended"), points(&o, |s| f64::from(s.tasks))));
            charts
                .oldest
                .push((label("recommended"), points(&o, |s| s.oldest_secs)));
        }
        (p, s)
    });
    if recommended.is_none() {
        pre_scaled(inputs, policy, capacity, &traffic, md);
    }
    Scenario {
        multiple,
        defaults,
        recommended,
    }
}

/// Scaling reacts in about four minutes (three one-minute datapoints, then the task starts): a
/// ramp faster than that is met only by tasks started before the sale. Their row, or why even
/// that does not do.
fn pre_scaled(
    inputs: &Inputs,
    policy: &Policy,
    capacity: &Capacity,
    traffic: &Traffic,
    md: &mut String,
) {
    let multiple = traffic.multiple;
    let peak = inputs.base_rate * multiple;
    let need = (peak / (0.7 * inputs.per_task_rate)).ceil() as u32;
    let pre = Policy {
        min_tasks: need,
        max_tasks: need.max(policy.max_tasks),
        ..*policy
    };
    let o = simulate(&pre, capacity, traffic);
    if o.peak_oldest_secs < inputs.target_age_secs {
        let s = summary(&o, inputs, peak);
        row(
            md,
            multiple,
            &format!("no cap reacts in time: pre-scaled to {need} tasks before the sale"),
            &s,
        );
    } else {
        md.push_str(&format!("| {multiple}× | neither a task cap up to 200 nor {need} tasks started before the sale keep the oldest message under {} s: {} binds | | | | | | | |\n", inputs.target_age_secs, o.first_bound.unwrap_or("?")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(per_task_rate: f64) -> Capacity {
        Capacity {
            per_task_rate,
            dynamodb_rate: f64::INFINITY,
            sqs_in_flight: 120_000,
            message_secs: 0.1,
        }
    }

    fn sale(multiple: f64) -> Traffic {
        Traffic {
            base_rate: 25.0,
            multiple,
            before_secs: 300,
            ramp_secs: 300,
            hold_secs: 1_200,
            after_secs: 1_800,
        }
    }

    #[test]
    fn the_curve_ramps_holds_and_falls() {
        let s = sale(10.0);
        assert_eq!(s.rate(0), 25.0);
        assert_eq!(s.rate(450), 137.5);
        assert_eq!(s.rate(700), 250.0);
        assert_eq!(s.rate(1_950), 137.5);
        assert_eq!(s.rate(3_000), 25.0);
    }

    #[test]
    fn what_one_task_keeps_up_with_never_scales_or_alarms() {
        let o = simulate(&Policy::default(), &capacity(150.0), &sale(1.0));
        assert_eq!(o.peak_tasks, 1);
        assert!(o.peak_oldest_secs <= 1.0, "{}", o.peak_oldest_secs);
        assert_eq!(
            (o.oldest_alarm_at, o.depth_alarm_at, o.first_bound),
            (None, None, None)
        );
    }

    #[test]
    fn a_peak_over_the_task_cap_grows_the_backlog_until_the_alarm_and_drains_after() {
        // 100 × 25 = 2,500 msg/s against 10 tasks of 150.
        let o = simulate(&Policy::default(), &capacity(150.0), &sale(100.0));
        assert_eq!(o.peak_tasks, 10);
        assert_eq!(
            o.first_bound,
            Some("scaling"),
            "the ramp outruns the scaling first"
        );
        assert!(o
            .bound_secs
            .iter()
            .any(|(l, s)| *l == "task_cap" && *s > 600));
        let alarm = o.oldest_alarm_at.expect("the oldest message passes 600 s");
        assert!(
            alarm > 600 + 180,
            "{alarm}: three minutes over the threshold first"
        );
        assert!(
            o.series.last().unwrap().backlog < 1.0,
            "drained after the sale"
        );
        assert!(o.series.last().unwrap().tasks < 10, "scaled back in");
        // A higher cap keeps up, with fewer alarms.
        let wider = Policy {
            max_tasks: 25,
            ..Policy::default()
        };
        let o2 = simulate(&wider, &capacity(150.0), &sale(100.0));
        assert!(o2.peak_oldest_secs < o.peak_oldest_secs);
        assert!(o2.peak_tasks > 10);
    }

    #[test]
    fn a_backlog_target_scales_in_during_the_peak_and_an_arrivals_target_does_not() {
        let hold = 600..1_800; // the peak, seconds
        let min_in_hold = |o: &Outcome| {
            o.series[hold.clone()]
                .iter()
                .map(|s| s.tasks)
                .min()
                .unwrap()
        };
        let backlog = simulate(&Policy::default(), &capacity(150.0), &sale(10.0));
        assert_eq!(
            min_in_hold(&backlog),
            1,
            "the backlog reads 0 while tasks keep up"
        );
        let arrivals = Policy {
            arrivals_per_task: Some(105.0),
            ..Policy::default()
        };
        let o = simulate(&arrivals, &capacity(150.0), &sale(10.0));
        assert!(min_in_hold(&o) >= 2, "{}", min_in_hold(&o));
        assert!(o.peak_oldest_secs < backlog.peak_oldest_secs);
    }

    #[test]
    fn dynamodb_binds_when_it_allows_less_than_the_tasks() {
        let c = Capacity {
            dynamodb_rate: 500.0,
            ..capacity(150.0)
        };
        let o = simulate(
            &Policy {
                max_tasks: 50,
                ..Policy::default()
            },
            &c,
            &sale(100.0),
        );
        assert!(o
            .bound_secs
            .iter()
            .any(|(l, s)| *l == "dynamodb" && *s > 600));
        assert!(
            smallest_policy(&Policy::default(), &c, &sale(100.0), &[500.0], 60, 120.0).is_none(),
            "no task cap fixes a DynamoDB bound"
        );
        let found = smallest_policy(
            &Policy::default(),
            &capacity(150.0),
            &sale(10.0),
            &[500.0, 150.0],
            60,
            120.0,
        )
        .expect("10x fits");
        assert!(simulate(&found, &capacity(150.0), &sale(10.0)).peak_oldest_secs < 120.0);
    }
}
