//! Small SVG charts for the report: no plotting dependency, readable in any browser.

use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 300.0;
const PAD: f64 = 50.0;

fn frame(title: &str, x_label: &str, y_label: &str, y_max: f64, x_max: f64) -> String {
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = write!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{title}</text>"#,
        W / 2.0
    );
    let _ = write!(
        s,
        r#"<line x1="{PAD}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{}" stroke="black"/>"#,
        H - PAD,
        W - PAD,
        H - PAD,
        H - PAD
    );
    for i in 0..=4 {
        let frac = f64::from(i) / 4.0;
        let y = H - PAD - frac * (H - 2.0 * PAD);
        let x = PAD + frac * (W - 2.0 * PAD);
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{:.0}</text><line x1="{PAD}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/>"##,
            PAD - 5.0,
            y + 4.0,
            y_max * frac,
            W - PAD
        );
        let _ = write!(
            s,
            r#"<text x="{x}" y="{}" text-anchor="middle">{:.0}</text>"#,
            H - PAD + 16.0,
            x_max * frac
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text>"#,
        W / 2.0,
        H - 10.0
    );
    let _ = write!(
        s,
        r#"<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">{y_label}</text>"#,
        H / 2.0,
        H / 2.0
    );
    s
}

/// A line chart of (x, y) points.
pub fn line(title: &str, x_label: &str, y_label: &str, points: &[(f64, f64)]) -> String {
    lines(title, x_label, y_label, &[(String::new(), points.to_vec())])
}

/// A line chart of several named series, with a legend.
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let all = || series.iter().flat_map(|(_, p)| p.iter());
    let x_max = all().map(|p| p.0).fold(1.0, f64::max);
    let y_max = all().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut s = frame(title, x_label, y_label, y_max, x_max);
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    PAD + x / x_max * (W - 2.0 * PAD),
                    H - PAD - y / y_max * (H - 2.0 * PAD)
                )
            })
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/><text x="{}" y="{}" fill="{colour}">{name}</text>"#,
            path.join(" "),
            PAD + 10.0,
            PAD + 14.0 * (i as f64 + 1.0)
        );
    }
    s.push_str("</svg>");
    s
}

/// A bar chart of labelled values.
pub fn bars(title: &str, y_label: &str, bars: &[(String, f64)]) -> String {
    let y_max = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.1;
    let mut s = frame(title, "", y_label, y_max, 0.0);
    let slot = (W - 2.0 * PAD) / bars.len().max(1) as f64;
    for (i, (label, v)) in bars.iter().enumerate() {
        let h = v / y_max * (H - 2.0 * PAD);
        let x = PAD + slot * i as f64 + slot * 0.15;
        let _ = write!(
            s,
            r##"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#1f77b4"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text><text x="{:.1}" y="{:.1}" text-anchor="middle">{v:.0}</text>"##,
            H - PAD - h,
            slot * 0.7,
            x + slot * 0.35,
            H - PAD + 30.0,
            x + slot * 0.35,
            H - PAD - h - 4.0
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn charts_are_well_formed_svg() {
        let l = super::line("t", "s", "msg/s", &[(0.0, 1.0), (1.0, 3.0)]);
        assert!(l.starts_with("<svg") && l.ends_with("</svg>") && l.contains("polyline"));
        let m = super::lines(
            "t",
            "s",
            "n",
            &[
                ("a".into(), vec![(0.0, 1.0)]),
                ("b".into(), vec![(1.0, 2.0)]),
            ],
        );
        assert!(m.ends_with("</svg>") && m.matches("<polyline").count() == 2);
        let b = super::bars("t", "ms", &[("p50".into(), 10.0), ("p99".into(), 40.0)]);
        assert!(b.ends_with("</svg>") && b.matches("<rect").count() == 3);
    }
}
