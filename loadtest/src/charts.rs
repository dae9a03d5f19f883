//! The report's charts, drawn with plotters as self-contained SVG: round tick values chosen by
//! plotters, labels that do not overlap, a legend per chart. Lines over time (with marks for
//! the run's phases and a bound drawn as a dashed line), and a latency distribution by
//! percentile on a log scale, HdrHistogram style.

use plotters::coord::ranged1d::{KeyPointHint, Ranged, ValueFormatter};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Size of every chart, pixels.
const SIZE: (u32, u32) = (960, 380);
/// Series colours (colour-blind safe, Okabe–Ito).
const COLOURS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];

/// A chart of lines against a shared x axis.
#[derive(Debug, Default)]
pub struct Lines {
    /// The title.
    pub title: String,
    /// What x is.
    pub x_label: String,
    /// What y is.
    pub y_label: String,
    /// Named series of (x, y).
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    /// Horizontal reference lines (a bound), dashed: (label, y).
    pub bounds: Vec<(String, f64)>,
    /// Vertical marks (phases): (label, x).
    pub marks: Vec<(String, f64)>,
    /// Scale y to the bulk of the points (the 98th percentile, and the bounds) rather than to
    /// short peaks, which then run off the top; the title says so.
    pub clip_peaks: bool,
}

/// Draws `chart` as an SVG document.
pub fn lines(chart: &Lines) -> String {
    let mut svg = String::new();
    if let Err(e) = draw_lines(chart, &mut svg) {
        return error_svg(&chart.title, &e.to_string());
    }
    svg
}

fn draw_lines<'a>(
    chart: &Lines,
    out: &'a mut String,
) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let points = || chart.series.iter().flat_map(|(_, p)| p.iter());
    let x_max = points()
        .map(|p| p.0)
        .chain(chart.marks.iter().map(|m| m.1))
        .fold(1.0, f64::max);
    let highest = points().map(|p| p.1).fold(1.0, f64::max);
    let top = if chart.clip_peaks {
        let mut ys: Vec<f64> = points().map(|p| p.1).filter(|y| y.is_finite()).collect();
        ys.sort_by(f64::total_cmp);
        ys.get(ys.len() * 98 / 100).copied().unwrap_or(1.0)
    } else {
        highest
    };
    let y_max = chart
        .bounds
        .iter()
        .map(|b| b.1)
        .fold(top.max(1.0), f64::max)
        * 1.12;
    let title = if highest > y_max {
        format!(
            "{} (peaks up to {} cut off)",
            chart.title,
            tick(highest.round())
        )
    } else {
        chart.title.clone()
    };
    let root = SVGBackend::with_string(out, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&title, ("sans-serif", 18))?;
    let (plot, legend_area) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
    let mut legend = Vec::new();
    let mut c = ChartBuilder::on(&plot)
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    c.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .x_labels(10)
        .y_labels(6)
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (i, (label, x)) in chart.marks.iter().enumerate() {
        let grey = RGBColor(110, 110, 110);
        c.draw_series(std::iter::once(PathElement::new(
            vec![(*x, 0.0), (*x, y_max)],
            grey.stroke_width(1),
        )))?;
        // Labels on three staggered rows, so that close marks do not overlap; near the right
        // edge a label is written leftwards of its line, so that it is not cut off.
        let (text, anchor) = if *x > x_max * 0.8 {
            (format!("{label} "), HPos::Right)
        } else {
            (format!(" {label}"), HPos::Left)
        };
        let row = [0.99, 0.93, 0.87][i % 3];
        c.draw_series(std::iter::once(Text::new(
            text,
            (*x, y_max * row),
            ("sans-serif", 12)
                .into_font()
                .color(&grey)
                .pos(Pos::new(anchor, VPos::Top)),
        )))?;
    }
    for (i, (label, y)) in chart.bounds.iter().enumerate() {
        let colour = COLOURS[(chart.series.len() + i) % COLOURS.len()];
        c.draw_series(DashedLineSeries::new(
            vec![(0.0, *y), (x_max, *y)],
            8,
            5,
            colour.stroke_width(2),
        ))?;
        legend.push((format!("{label}: {y:.0}"), colour, true));
    }
    for (i, (name, points)) in chart.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        c.draw_series(LineSeries::new(
            points.iter().copied(),
            colour.stroke_width(2),
        ))?;
        legend.push((name.clone(), colour, false));
    }
    draw_legend(&legend_area, &legend)?;
    root.present()?;
    Ok(())
}

/// Width of the legend, right of the plot.
const LEGEND_WIDTH: u32 = 190;

/// The legend, beside the plot (never over a line or a label): a line sample and the name of
/// each series, dashed for a bound.
fn draw_legend<'a>(
    area: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    entries: &[(String, RGBColor, bool)],
) -> Result<(), Box<dyn std::error::Error + 'a>> {
    for (i, (name, colour, dashed)) in entries.iter().enumerate() {
        let y = 30 + 20 * i32::try_from(i).unwrap_or(0);
        let style = colour.stroke_width(2);
        if *dashed {
            area.draw(&PathElement::new(vec![(4, y), (10, y)], style))?;
            area.draw(&PathElement::new(vec![(14, y), (20, y)], style))?;
        } else {
            area.draw(&PathElement::new(vec![(4, y), (20, y)], style))?;
        }
        area.draw(&Text::new(
            name.clone(),
            (26, y),
            ("sans-serif", 12)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    Ok(())
}

/// One latency curve: its name, (quantile in 0..1, milliseconds) points, and the maximum.
pub type Curve = (String, Vec<(f64, f64)>, f64);

/// Latency by percentile: one series per measured span, each (quantile, ms) from a histogram.
#[derive(Debug, Default)]
pub struct Percentiles {
    /// The title.
    pub title: String,
    /// One curve per measured span.
    pub series: Vec<Curve>,
}

/// Where a quantile sits on the x axis: log10 of 1 / (1 − q), so that 90 %, 99 % and 99.9 %
/// are evenly spaced; the maximum is drawn just past 99.9 %.
fn percentile_x(q: f64) -> f64 {
    (1.0 / (1.0 - q.min(0.999))).log10()
}

/// Where the maximum is drawn.
const MAX_X: f64 = 3.35;

/// The percentile axis: ticks only at the percentiles that are read (50 %, 90 %, 99 %,
/// 99.9 %, max), labelled as such.
#[derive(Debug, Clone)]
struct PercentileAxis;

impl Ranged for PercentileAxis {
    type FormatOption = plotters::coord::ranged1d::NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let span = f64::from(limit.1 - limit.0);
        limit.0 + (value / MAX_X * span).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        vec![0.0, percentile_x(0.5), 1.0, 2.0, 3.0, MAX_X]
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..MAX_X
    }
}

impl ValueFormatter<f64> for PercentileAxis {
    fn format_ext(&self, value: &f64) -> String {
        percentile_label(*value)
    }
}

fn percentile_label(x: f64) -> String {
    let labels = [
        (0.0, "0%"),
        (percentile_x(0.5), "50%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (MAX_X, "max"),
    ];
    labels
        .iter()
        .find(|(at, _)| (at - x).abs() < 1e-6)
        .map_or_else(String::new, |(_, l)| (*l).to_owned())
}

/// Draws the latency distribution as an SVG document.
pub fn percentiles(chart: &Percentiles) -> String {
    let mut svg = String::new();
    if let Err(e) = draw_percentiles(chart, &mut svg) {
        return error_svg(&chart.title, &e.to_string());
    }
    svg
}

fn draw_percentiles<'a>(
    chart: &Percentiles,
    out: &'a mut String,
) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let y_max = chart
        .series
        .iter()
        .flat_map(|(_, p, max)| p.iter().map(|q| q.1).chain(std::iter::once(*max)))
        .fold(1.0, f64::max)
        * 1.12;
    let root = SVGBackend::with_string(out, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&chart.title, ("sans-serif", 18))?;
    let (plot, legend_area) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
    let mut legend = Vec::new();
    let mut c = ChartBuilder::on(&plot)
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(PercentileAxis, 0f64..y_max)?;
    c.configure_mesh()
        .x_desc("percentile (log scale)")
        .y_desc("milliseconds")
        .y_labels(6)
        .y_label_formatter(&|v| tick(*v))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (i, (name, points, max)) in chart.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let line: Vec<(f64, f64)> = points
            .iter()
            .filter(|(q, _)| *q <= 0.999)
            .map(|(q, ms)| (percentile_x(*q), *ms))
            .chain(std::iter::once((MAX_X, *max)))
            .collect();
        c.draw_series(LineSeries::new(line, colour.stroke_width(2)))?;
        legend.push((name.clone(), colour, false));
    }
    draw_legend(&legend_area, &legend)?;
    root.present()?;
    Ok(())
}

/// A tick value: whole numbers as such, thousands with a thin separator, small ones with the
/// decimals they need.
fn tick(v: f64) -> String {
    if v.abs() >= 1000.0 {
        let whole = v.round() as i64;
        let digits = whole.abs().to_string();
        let mut grouped = String::new();
        for (i, ch) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(ch);
        }
        if whole < 0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A chart that could not be drawn: its title and why, as SVG (a report still gets written).
fn error_svg(title: &str, error: &str) -> String {
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="60"><text x="10" y="30" font-family="sans-serif">{}: not drawn ({})</text></svg>"#,
        SIZE.0,
        escape(title),
        escape(error)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "writes /tmp/chart-peaks.svg to look at"]
    fn peaks_chart_for_a_look() {
        let mut points: Vec<(f64, f64)> = (0..100).map(|i| (f64::from(i), 60.0)).collect();
        points[50].1 = 3_700.0;
        let svg = lines(&Lines {
            title: "Throughput".into(),
            x_label: "seconds".into(),
            y_label: "messages/s".into(),
            series: vec![("all".into(), points)],
            bounds: vec![("bound".into(), 111.0)],
            marks: vec![],
            clip_peaks: true,
        });
        std::fs::write("/tmp/chart-peaks.svg", svg).unwrap();
    }

    #[test]
    fn ticks_are_round_and_readable() {
        assert_eq!(tick(10_000.0), "10,000");
        assert_eq!(tick(1_234_567.0), "1,234,567");
        assert_eq!(tick(250.0), "250");
        assert_eq!(tick(12.5), "12.5");
        assert_eq!(tick(0.25), "0.25");
    }

    #[test]
    fn percentiles_are_spaced_by_nines() {
        assert!((percentile_x(0.9) - 1.0).abs() < 1e-9);
        assert!((percentile_x(0.99) - 2.0).abs() < 1e-9);
        assert!((percentile_x(0.999) - 3.0).abs() < 1e-9);
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(MAX_X), "max");
        assert_eq!(percentile_label(1.5), "");
    }

    #[test]
    fn charts_are_svg_with_a_line_per_series_and_the_bound_dashed() {
        let chart = Lines {
            title: "Throughput".into(),
            x_label: "seconds".into(),
            y_label: "messages/s".into(),
            series: vec![
                ("orders".into(), vec![(0.0, 10.0), (1.0, 30.0), (2.0, 25.0)]),
                ("warehouse".into(), vec![(0.0, 5.0), (2.0, 20.0)]),
            ],
            bounds: vec![("bound".into(), 40.0)],
            marks: vec![("drained".into(), 1.5)],
            clip_peaks: false,
        };
        let svg = lines(&chart);
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{svg}"
        );
        assert!(svg.contains("orders") && svg.contains("warehouse") && svg.contains("bound"));
        assert!(svg.contains("drained"));
        assert!(!svg.contains("not drawn"), "{svg}");
        let latency = percentiles(&Percentiles {
            title: "Latency".into(),
            series: vec![(
                "enqueue → final".into(),
                vec![(0.5, 100.0), (0.99, 300.0)],
                400.0,
            )],
        });
        assert!(
            latency.contains("99.9%") && latency.contains("max"),
            "{latency}"
        );
        assert!(!latency.contains("not drawn"), "{latency}");
    }
}
