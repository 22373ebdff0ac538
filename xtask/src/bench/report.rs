//! The results: per-repetition values folded into median [min–max] cells with ratios to
//! direct and sslh-fork, written as Markdown tables, JSON, and SVG bar charts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;

use super::Profile;
use super::procfs::Machine;

/// The systems every figure is compared with.
const REFERENCES: [&str; 2] = ["direct", "sslh-fork"];

/// One metric of one repetition.
#[derive(Debug, Clone)]
pub enum Value {
    Num(f64),
    /// Why there is no number, as a table cell says it (`n/a: ...`).
    Na(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    pub lower_is_better: bool,
    /// Ratios mean nothing for counts such as errors or connections held.
    pub ratios: bool,
}

impl Metric {
    pub fn new(key: &'static str, label: &'static str, lower_is_better: bool) -> Metric {
        Metric {
            key,
            label,
            lower_is_better,
            ratios: !matches!(key, "errors" | "connections"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub reps: Vec<f64>,
    /// This median divided by direct's (same case); None when either has no number.
    pub vs_direct: Option<f64>,
    pub vs_sslh_fork: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Cell {
    Figure(Figure),
    Na(String),
}

impl Cell {
    fn median(&self) -> Option<f64> {
        match self {
            Cell::Figure(f) => Some(f.median),
            Cell::Na(_) => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub case: String,
    pub system: &'static str,
    pub cells: Vec<Cell>,
}

impl Row {
    /// Folds repetitions (each a value per metric) into one cell per metric. One failed
    /// repetition makes the cell n/a: a median over the survivors would hide the failure.
    pub fn new(case: String, system: &'static str, reps: &[Vec<Value>]) -> Row {
        let metrics = reps.first().map_or(0, Vec::len);
        let cells = (0..metrics)
            .map(|i| {
                let mut nums = Vec::new();
                for rep in reps {
                    match &rep[i] {
                        Value::Num(v) => nums.push(*v),
                        Value::Na(why) => return Cell::Na(why.clone()),
                    }
                }
                let mut sorted = nums.clone();
                sorted.sort_by(f64::total_cmp);
                Cell::Figure(Figure {
                    median: median(&sorted),
                    min: sorted[0],
                    max: sorted[sorted.len() - 1],
                    reps: nums,
                    vs_direct: None,
                    vs_sslh_fork: None,
                })
            })
            .collect();
        Row {
            case,
            system,
            cells,
        }
    }
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Section {
    pub key: &'static str,
    pub title: &'static str,
    pub about: String,
    pub metrics: Vec<Metric>,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Section {
    pub fn new(
        key: &'static str,
        title: &'static str,
        about: String,
        metrics: Vec<Metric>,
        mut rows: Vec<Row>,
        notes: Vec<String>,
    ) -> Section {
        let reference = |rows: &[Row], system: &str, case: &str, i: usize| {
            rows.iter()
                .find(|r| r.system == system && r.case == case)
                .and_then(|r| r.cells[i].median())
        };
        let snapshot = rows.clone();
        for row in &mut rows {
            for (i, cell) in row.cells.iter_mut().enumerate() {
                let Cell::Figure(f) = cell else { continue };
                if !metrics[i].ratios {
                    continue;
                }
                let ratio = |system| {
                    reference(&snapshot, system, &row.case, i)
                        .filter(|r| *r != 0.0)
                        .map(|r| f.median / r)
                };
                f.vs_direct = ratio(REFERENCES[0]);
                f.vs_sslh_fork = ratio(REFERENCES[1]);
            }
        }
        Section {
            key,
            title,
            about,
            metrics,
            rows,
            notes,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub command: String,
    pub machine: Machine,
    pub profile: Profile,
    pub versions: BTreeMap<String, String>,
    pub wall_seconds: f64,
    pub sections: Vec<Section>,
}

/// Three significant digits or so, without scientific notation.
fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// `median [min–max] (×direct, ×sslh-fork)`, the ratios only for references in the table.
fn cell_text(cell: &Cell, metric: &Metric, present: [bool; 2]) -> String {
    match cell {
        Cell::Na(why) => why.replace('|', "\\|"),
        Cell::Figure(f) => {
            let mut s = format!("{} [{}–{}]", num(f.median), num(f.min), num(f.max));
            if metric.ratios && present.contains(&true) {
                let ratios: Vec<String> = [f.vs_direct, f.vs_sslh_fork]
                    .iter()
                    .zip(present)
                    .filter(|(_, p)| *p)
                    .map(|(x, _)| x.map_or("n/a".into(), |x| format!("×{x:.2}")))
                    .collect();
                let _ = write!(s, " ({})", ratios.join(", "));
            }
            s
        }
    }
}

/// The Markdown of a whole run. Charts are linked as `{chart_prefix}{name}.svg`; `reproduce`
/// adds how to get these numbers again (for docs/benchmarks.md).
pub fn markdown(
    report: &Report,
    charts: &[(String, String)],
    chart_prefix: &str,
    reproduce: bool,
) -> String {
    let m = &report.machine;
    let p = &report.profile;
    let mut out = String::from("# mux benchmarks\n\n");
    let _ = writeln!(
        out,
        "`{}` on {}, {:.0}s in all.\n",
        report.command, m.date, report.wall_seconds
    );
    let _ = writeln!(
        out,
        "Machine: {}, {} cores, {} GiB, Linux {}.\n",
        m.cpu, m.cores, m.memory_gib, m.kernel
    );
    let versions: Vec<String> = report
        .versions
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(out, "Versions: {}.\n", versions.join(", "));
    let _ = writeln!(
        out,
        "Each figure is the median [min–max] of {} repetitions, then (×direct, ×sslh-fork): the median \
         divided by direct's and by sslh-fork's for the same case (where the table has them). Higher is better for throughput and \
         rates; lower is better for latency, CPU and memory, so there a ratio below 1 is better. Every \
         system runs on loopback (but for the remote workload's client, across a veth) on the same {} cores \
         as the load generator and the backend, so a proxy's own CPU use also slows what it serves. Repetitions are interleaved case by case: each turn \
         measures one case on every system in turn, each started afresh for it, each turn starting \
         one system later than the one before, so that the machine's drift during the run (this VM \
         has slow phases of 20-25 s in which even direct loses a quarter of its round-trip rate) \
         falls on neighbouring measurements of several systems alike. Each runs with its default logging: mux and sslh write a \
         line per connection to stderr (a file here), HAProxy has no log directive, Caddy logs no requests.\n",
        p.reps, m.cores
    );
    for s in &report.sections {
        let _ = writeln!(out, "## {}\n\n{}\n", s.title, s.about);
        out.push_str(&table(s));
        if !s.notes.is_empty() {
            out.push('\n');
        }
        for note in &s.notes {
            let _ = writeln!(out, "- {note}");
        }
        for (section, name) in charts {
            if section == s.key {
                let _ = writeln!(out, "\n![{name}]({chart_prefix}{name}.svg)");
            }
        }
        out.push('\n');
    }
    if reproduce {
        out.push_str(REPRODUCE);
    }
    out
}

const REPRODUCE: &str = "## Reproduce\n\n\
On Debian 12 as root (the eBPF data path and the package installs need it), from a clone:\n\n\
```sh\n\
cargo xtask bench --full      # about 40 minutes; rewrites this page and its charts\n\
cargo xtask bench --quick     # about 3 minutes: fewer, shorter repetitions\n\
cargo xtask bench http        # one suite: datapath (bulk, remote bulk, request-response, connection rate, memory) or http\n\
```\n\n\
It installs what is missing (iperf3, wrk, sslh, haproxy, caddy, and the eBPF toolchain), builds mux and \
loadgen in release mode, starts every system on ephemeral loopback ports with its own config in a \
temporary directory (never the system services; the remote workload makes a network namespace and a \
veth on 198.18.231.0/30, removed at its end), and writes `bench/results/latest.md`, \
`latest.json` and the charts.\n";

pub fn table(s: &Section) -> String {
    let present = REFERENCES.map(|r| s.rows.iter().any(|row| row.system == r));
    let mut out = String::from("| case | system |");
    let mut rule = String::from("| --- | --- |");
    for m in &s.metrics {
        let _ = write!(out, " {} |", m.label);
        rule.push_str(" ---: |");
    }
    out.push('\n');
    out.push_str(&rule);
    out.push('\n');
    for row in &s.rows {
        let _ = write!(out, "| {} | {} |", row.case, row.system);
        for (cell, m) in row.cells.iter().zip(&s.metrics) {
            let _ = write!(out, " {} |", cell_text(cell, m, present));
        }
        out.push('\n');
    }
    out
}

pub fn write_json(path: &Path, report: &Report) -> Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

// ---- charts -------------------------------------------------------------------------------

/// What a chart shows: one bar group per system, one bar per case of one metric, or (with
/// `metrics`) one bar per metric of the section's single case.
struct ChartSpec {
    name: &'static str,
    section: &'static str,
    title: &'static str,
    metrics: &'static [&'static str],
}

const CHARTS: &[ChartSpec] = &[
    ChartSpec {
        name: "bulk",
        section: "bulk",
        title: "Bulk throughput, Gbit/s (higher is better)",
        metrics: &["gbps"],
    },
    ChartSpec {
        name: "remote",
        section: "remote",
        title: "Bulk throughput to a client across a veth, Gbit/s (higher is better)",
        metrics: &["gbps"],
    },
    ChartSpec {
        name: "bulk-cpu",
        section: "bulk",
        title: "Proxy CPU seconds per GB moved (lower is better)",
        metrics: &["proxy_cpu_s_per_gb"],
    },
    ChartSpec {
        name: "bulk-all-cpu",
        section: "bulk",
        title: "Whole-machine CPU seconds per GB moved (lower is better)",
        metrics: &["machine_cpu_s_per_gb"],
    },
    ChartSpec {
        name: "rr-p99",
        section: "rr",
        title: "64-byte round trip, p99 latency in µs (lower is better)",
        metrics: &["p99_us"],
    },
    ChartSpec {
        name: "connrate",
        section: "connrate",
        title: "Connections per second, 64 clients (higher is better)",
        metrics: &["conns_per_s"],
    },
    ChartSpec {
        name: "memory",
        section: "memory",
        title: "KiB per idle relayed connection (lower is better)",
        metrics: &["rss_kib_per_conn", "pss_kib_per_conn"],
    },
    ChartSpec {
        name: "http",
        section: "http",
        title: "HTTP requests per second, wrk -c64 (higher is better)",
        metrics: &["requests_per_s"],
    },
];

/// Bar heights with their min–max whiskers; None draws `n/a`.
type Series = (String, Vec<Option<(f64, f64, f64)>>);

/// Draws every chart whose section ran into `dir`; gives (section, chart name) of each.
pub fn write_charts(dir: &Path, sections: &[Section]) -> Result<Vec<(String, String)>> {
    let mut written = Vec::new();
    for spec in CHARTS {
        let Some(s) = sections.iter().find(|s| s.key == spec.section) else {
            continue;
        };
        let mut systems: Vec<&str> = Vec::new();
        let mut cases: Vec<&str> = Vec::new();
        for r in &s.rows {
            if !systems.contains(&r.system) {
                systems.push(r.system);
            }
            if !cases.contains(&r.case.as_str()) {
                cases.push(&r.case);
            }
        }
        let value = |system: &str, case: &str, metric: &str| {
            let i = s.metrics.iter().position(|m| m.key == metric)?;
            let row = s
                .rows
                .iter()
                .find(|r| r.system == system && r.case == case)?;
            match &row.cells[i] {
                Cell::Figure(f) => Some((f.median, f.min, f.max)),
                Cell::Na(_) => None,
            }
        };
        let series: Vec<Series> = if spec.metrics.len() == 1 {
            cases
                .iter()
                .map(|c| {
                    let v = systems
                        .iter()
                        .map(|sys| value(sys, c, spec.metrics[0]))
                        .collect();
                    (c.to_string(), v)
                })
                .collect()
        } else {
            spec.metrics
                .iter()
                .map(|m| {
                    let label = s
                        .metrics
                        .iter()
                        .find(|x| x.key == *m)
                        .map_or(*m, |x| x.label);
                    let v = systems.iter().map(|sys| value(sys, cases[0], m)).collect();
                    (label.to_string(), v)
                })
                .collect()
        };
        let path = dir.join(format!("{}.svg", spec.name));
        bar_chart(&path, spec.title, &systems, &series)
            .with_context(|| format!("drawing {}", path.display()))?;
        written.push((spec.section.to_string(), spec.name.to_string()));
    }
    Ok(written)
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

fn bar_chart(path: &Path, title: &str, systems: &[&str], series: &[Series]) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().map(|&(_, _, max)| max))
        .fold(0.0, f64::max);
    // Head room for the legend and the value labels above the tallest bar.
    let ymax = if top > 0.0 { top * 1.3 } else { 1.0 };
    let n = systems.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..n, 0f64..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_label_formatter(&|y| num(*y))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;

    let groups = series.len().max(1) as f64;
    let width = 0.8 / groups;
    for (j, (label, values)) in series.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        let x0 = |i: usize| i as f64 + 0.1 + j as f64 * width;
        chart
            .draw_series(values.iter().enumerate().filter_map(|(i, v)| {
                v.map(|(median, _, _)| {
                    Rectangle::new(
                        [(x0(i), 0.0), (x0(i) + width * 0.92, median)],
                        color.filled(),
                    )
                })
            }))?
            .label(label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        chart.draw_series(values.iter().enumerate().filter_map(|(i, v)| {
            v.map(|(median, min, max)| {
                ErrorBar::new_vertical(
                    x0(i) + width * 0.46,
                    min,
                    median,
                    max,
                    BLACK.stroke_width(1),
                    6,
                )
            })
        }))?;
        // The median over each bar, and `n/a` where there is none, so no bar is silently absent.
        let small = ("sans-serif", 11).into_font().color(&BLACK);
        for (i, v) in values.iter().enumerate() {
            let (text, y) = match v {
                Some((median, _, max)) => (num(*median), *max),
                None => ("n/a".to_string(), 0.0),
            };
            let (px, py) = chart.backend_coord(&(x0(i) + width * 0.46, y));
            root.draw(&Text::new(
                text,
                (px, py - 4),
                small.pos(Pos::new(HPos::Center, VPos::Bottom)),
            ))?;
        }
    }
    for (i, name) in systems.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            name.to_string(),
            (px, py + 10),
            ("sans-serif", 14)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.5))
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reps(v: &[f64]) -> Vec<Vec<Value>> {
        v.iter().map(|x| vec![Value::Num(*x)]).collect()
    }

    #[test]
    fn median_min_max_and_ratios() {
        let rows = vec![
            Row::new("c".into(), "direct", &reps(&[10.0, 30.0, 20.0])),
            Row::new("c".into(), "sslh-fork", &reps(&[5.0, 5.0, 5.0])),
            Row::new("c".into(), "mux-copy", &reps(&[15.0, 9.0, 10.0])),
        ];
        let s = Section::new(
            "k",
            "t",
            String::new(),
            vec![Metric::new("gbps", "Gbit/s", false)],
            rows,
            vec![],
        );
        let Cell::Figure(f) = &s.rows[2].cells[0] else {
            panic!()
        };
        assert_eq!((f.median, f.min, f.max), (10.0, 9.0, 15.0));
        assert_eq!(f.vs_direct, Some(0.5));
        assert_eq!(f.vs_sslh_fork, Some(2.0));
        assert_eq!(
            cell_text(&s.rows[2].cells[0], &s.metrics[0], [true, true]),
            "10.0 [9.00–15.0] (×0.50, ×2.00)"
        );
        assert_eq!(
            cell_text(&s.rows[2].cells[0], &s.metrics[0], [true, false]),
            "10.0 [9.00–15.0] (×0.50)"
        );
    }

    #[test]
    fn one_failed_rep_makes_the_cell_na() {
        let r = Row::new(
            "c".into(),
            "x",
            &[
                vec![Value::Num(1.0)],
                vec![Value::Na("n/a: it died".into())],
            ],
        );
        assert!(matches!(&r.cells[0], Cell::Na(w) if w == "n/a: it died"));
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), 2.5);
    }

    #[test]
    fn svg_has_its_text_without_fonts() {
        let dir = std::env::temp_dir().join(format!("xtask-chart-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.svg");
        let series = vec![
            ("upload".to_string(), vec![Some((10.0, 9.0, 11.0)), None]),
            (
                "download".to_string(),
                vec![Some((5.0, 4.0, 6.0)), Some((1.0, 1.0, 1.0))],
            ),
        ];
        bar_chart(&path, "Title here", &["direct", "mux-ebpf"], &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for text in ["Title here", "direct", "mux-ebpf", "upload", "n/a", "10.0"] {
            assert!(svg.contains(text), "{text} missing");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
