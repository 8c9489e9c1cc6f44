//! `bench.svg`, written by hand (no plotting dependency to build on CI): one column per
//! number of databases; rows are throughput, throughput relative to raw-2pc and p99 latency,
//! each against concurrency, one line per mode.

use crate::cell::CellResult;
use std::fmt::Write as _;

const PANEL_W: f64 = 440.0;
const PANEL_H: f64 = 280.0;
const MARGIN_L: f64 = 70.0;
const MARGIN_R: f64 = 20.0;
const MARGIN_T: f64 = 34.0;
const MARGIN_B: f64 = 46.0;
const HEADER: f64 = 70.0;
const MIN_WIDTH: f64 = 840.0;

const COLORS: [&str; 8] = [
    "#7f7f7f", "#1f77b4", "#2ca02c", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The smallest "round" number (1, 2, 2.5 or 5 times a power of ten) at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v * 0.999)
        .unwrap_or(10.0 * p)
}

/// A y-axis label with as many decimals as the tick step needs (so 0.4, 0.8, 1.2 line up).
fn label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else if step >= 0.1 {
        1
    } else {
        2
    };
    format!("{v:.decimals$}")
}

struct Metric {
    title: &'static str,
    value: fn(&CellResult) -> Option<f64>,
}

pub fn chart(
    cells: &[CellResult],
    modes: &[String],
    participants: &[usize],
    concurrency: &[usize],
    subtitle: &str,
) -> String {
    let metrics = [
        Metric {
            title: "throughput (committed tx/s)",
            value: |c| Some(c.throughput),
        },
        Metric {
            title: "throughput relative to raw-2pc (×)",
            value: |c| c.ratio_to_raw_2pc,
        },
        Metric {
            title: "p99 latency (ms)",
            value: |c| Some(c.latency.p99_us as f64 / 1000.0),
        },
    ];
    // Wide enough for the title and subtitle even with a single column of panels.
    let width = (PANEL_W * participants.len().max(1) as f64).max(MIN_WIDTH);
    let height = HEADER + PANEL_H * metrics.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="white"/><text x="12" y="22" font-size="16" font-weight="bold">paxos-commit benchmark: transfers across N PostgreSQL databases</text><text x="12" y="40" fill="#555" font-size="11">{}</text>"##,
        esc(subtitle)
    );
    // Legend.
    let mut lx = 12.0;
    for (i, m) in modes.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="58" x2="{}" y2="58" stroke="{color}" stroke-width="3"/><text x="{}" y="62">{}</text>"#,
            lx + 22.0,
            lx + 27.0,
            esc(m)
        );
        lx += 40.0 + 7.0 * m.len() as f64;
    }

    for (col, &n) in participants.iter().enumerate() {
        for (row, metric) in metrics.iter().enumerate() {
            let x0 = col as f64 * PANEL_W + MARGIN_L;
            let y0 = HEADER + row as f64 * PANEL_H + MARGIN_T;
            let w = PANEL_W - MARGIN_L - MARGIN_R;
            let h = PANEL_H - MARGIN_T - MARGIN_B;
            let ours: Vec<&CellResult> = cells.iter().filter(|c| c.participants == n).collect();
            let ymax = nice_ceiling(
                ours.iter()
                    .filter_map(|c| (metric.value)(c))
                    .fold(0.0, f64::max),
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" font-weight="bold">N = {n} databases: {}</text>"#,
                x0,
                y0 - 12.0,
                metric.title
            );
            // Grid and y labels.
            for k in 0..=5 {
                let v = ymax * k as f64 / 5.0;
                let y = y0 + h - h * k as f64 / 5.0;
                let _ = writeln!(
                    s,
                    r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end" fill="#333">{}</text>"##,
                    x0 + w,
                    x0 - 6.0,
                    y + 4.0,
                    label(v, ymax / 5.0)
                );
            }
            let _ = writeln!(
                s,
                r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##
            );
            // x positions: concurrency levels evenly spaced (they are roughly geometric).
            let xs = |i: usize| x0 + w * (i as f64 + 0.5) / concurrency.len().max(1) as f64;
            for (i, c) in concurrency.iter().enumerate() {
                let _ = writeln!(
                    s,
                    r##"<text x="{}" y="{}" text-anchor="middle" fill="#333">{c}</text>"##,
                    xs(i),
                    y0 + h + 16.0
                );
            }
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">concurrency (client tasks)</text>"##,
                x0 + w / 2.0,
                y0 + h + 34.0
            );
            for (mi, mode) in modes.iter().enumerate() {
                let color = COLORS[mi % COLORS.len()];
                let points: Vec<(f64, f64)> = concurrency
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| {
                        let cell = ours
                            .iter()
                            .find(|x| &x.mode == mode && x.concurrency == *c)?;
                        let v = (metric.value)(cell)?;
                        Some((xs(i), y0 + h - h * (v / ymax).min(1.0)))
                    })
                    .collect();
                if points.len() > 1 {
                    let path: Vec<String> = points
                        .iter()
                        .map(|(x, y)| format!("{x:.1},{y:.1}"))
                        .collect();
                    let _ = writeln!(
                        s,
                        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                        path.join(" ")
                    );
                }
                for (x, y) in points {
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"><title>{}</title></circle>"#,
                        esc(mode)
                    );
                }
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::nice_ceiling;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(1234.0), 2000.0);
        assert_eq!(nice_ceiling(2400.0), 2500.0);
        assert_eq!(nice_ceiling(100.0), 100.0);
    }
}
