//! `vmmu report`: one self-contained HTML page from the `--json` objects of
//! runs and benchmarks (and, optionally, a `--trace` timeline): each run's
//! configuration and summary, its fault latency by outcome, its retries by
//! cause, its phases (side by side with the real KVM where a benchmark has
//! both), fault latency over time from a trace, and a comparison when several
//! runs are given. Plots are SVG drawn with `plotters`, inlined in the page.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::Value;

use crate::args::BadInput;

const W: u32 = 900;
const H: u32 = 360;
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// One input: its file name and JSON object.
struct Run {
    file: String,
    v: Value,
}

/// Read every JSON object of `path` (one object, or one per line).
fn read_runs(path: &Path) -> anyhow::Result<Vec<Run>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadInput(format!("{}: cannot read: {e}", path.display())))?;
    let file = path.display().to_string();
    let objects: Vec<Value> = match serde_json::from_str::<Value>(&text) {
        Ok(v) => vec![v],
        Err(_) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str::<Value>)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                BadInput(format!(
                    "{file}: not the JSON of a run (`vmmu run|bench ... --json`): {e}"
                ))
            })?,
    };
    objects
        .into_iter()
        .map(|v| {
            if v.get("scenario").is_none() || !v.is_object() {
                anyhow::bail!(BadInput(format!(
                    "{file}: a JSON object without \"scenario\" is not the output of `vmmu run|bench|soak --json`"
                )));
            }
            Ok(Run {
                file: file.clone(),
                v,
            })
        })
        .collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// A two-column table of the scalar members of `v` (nested objects flattened
/// as `a.b`).
fn kv_table(out: &mut String, v: &Value, prefix: &str, skip: &[&str]) {
    let mut rows = Vec::new();
    flatten(v, prefix, skip, &mut rows);
    out.push_str("<table>");
    for (k, val) in rows {
        let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", esc(&k), esc(&val));
    }
    out.push_str("</table>");
}

fn flatten(v: &Value, prefix: &str, skip: &[&str], rows: &mut Vec<(String, String)>) {
    if let Value::Object(m) = v {
        for (k, val) in m {
            if skip.contains(&k.as_str()) {
                continue;
            }
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match val {
                Value::Object(_) => flatten(val, &key, skip, rows),
                Value::Array(_) => {}
                _ => {
                    if let Some(s) = scalar(val) {
                        rows.push((key, s));
                    }
                }
            }
        }
    }
}

/// Draw with `f` into an SVG string of the standard size.
fn svg(
    f: impl FnOnce(DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (W, H)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        f(root)?;
    }
    Ok(s)
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// The series' legend, boxed, in the chart's corner.
fn legend<'a, CT: CoordTranslate>(
    c: &mut ChartContext<'a, SVGBackend<'a>, CT>,
) -> anyhow::Result<()> {
    c.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(plot_err)
}

/// Fault latency by outcome: one line per outcome over power-of-two buckets.
fn latency_plot(title: &str, lat: &serde_json::Map<String, Value>) -> anyhow::Result<String> {
    let series: Vec<(String, Vec<(u64, u64)>)> = lat
        .iter()
        .map(|(name, h)| {
            let pts = h["buckets"]
                .as_array()
                .map(|b| {
                    b.iter()
                        .filter_map(|p| Some((p[0].as_u64()?.max(1), p[1].as_u64()?)))
                        .collect()
                })
                .unwrap_or_default();
            (name.clone(), pts)
        })
        .filter(|(_, p): &(String, Vec<(u64, u64)>)| !p.is_empty())
        .collect();
    let xmax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .max()
        .unwrap_or(2)
        .max(2)
        * 2;
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .max()
        .unwrap_or(1)
        .max(1)
        * 2;
    svg(|root| {
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((1u64..xmax).log_scale(), (1u64..ymax).log_scale())
            .map_err(plot_err)?;
        c.configure_mesh()
            .x_desc("fault call latency, ns (bucket upper bound)")
            .y_desc("faults")
            .draw()
            .map_err(plot_err)?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            c.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(plot_err)?;
        }
        legend(&mut c)?;
        Ok(())
    })
}

/// Bar chart of `(label, values)` groups: each group has one bar per series
/// (`names`). When the values span more than two orders of magnitude the
/// y axis is logarithmic, so small phases stay visible beside big ones.
fn bar_plot(
    title: &str,
    unit: &str,
    names: &[String],
    groups: &[(String, Vec<f64>)],
) -> anyhow::Result<String> {
    let vals = groups.iter().flat_map(|(_, v)| v.iter().copied());
    let ymax = vals.clone().fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let ymin = vals.filter(|v| *v > 0.0).fold(f64::MAX, f64::min);
    let log = ymin < f64::MAX && ymax / ymin > 100.0;
    let n = groups.len().max(1);
    svg(|root| {
        let mut b = ChartBuilder::on(&root);
        b.caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(70)
            .y_label_area_size(70);
        if log {
            let lo = ymin / 2.0;
            let mut c = b
                .build_cartesian_2d(0f64..n as f64, (lo..ymax * 2.0).log_scale())
                .map_err(plot_err)?;
            c.configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .y_desc(format!("{unit} (log scale)"))
                .draw()
                .map_err(plot_err)?;
            draw_bars(&root, &mut c, names, groups, lo)
        } else {
            let mut c = b
                .build_cartesian_2d(0f64..n as f64, 0f64..ymax)
                .map_err(plot_err)?;
            c.configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .y_desc(unit)
                .draw()
                .map_err(plot_err)?;
            draw_bars(&root, &mut c, names, groups, 0.0)
        }
    })
}

/// The bars of [`bar_plot`] from `base` up, group names under them (in
/// pixels: the axis has no labels of its own, its positions are not the
/// groups'), and a legend when there are several series.
fn draw_bars<'a, Y>(
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    c: &mut ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    names: &[String],
    groups: &[(String, Vec<f64>)],
    base: f64,
) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    let k = names.len().max(1);
    let width = 0.8 / k as f64;
    for (s, name) in names.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        let bars = groups.iter().enumerate().filter_map(move |(i, (_, v))| {
            let y = *v.get(s)?;
            let x0 = i as f64 + 0.1 + s as f64 * width;
            Some(Rectangle::new(
                [(x0, base), (x0 + width, y.max(base))],
                color.filled(),
            ))
        });
        c.draw_series(bars)
            .map_err(plot_err)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    for (i, (label, _)) in groups.iter().enumerate() {
        let (px, py) = c.backend_coord(&(i as f64 + 0.5, base));
        let text: String = if label.chars().count() > 22 {
            label.chars().take(21).chain(std::iter::once('…')).collect()
        } else {
            label.clone()
        };
        let off = (text.chars().count() as i32 * 3).min(60);
        root.draw(&Text::new(text, (px - off, py + 8), ("sans-serif", 12)))
            .map_err(plot_err)?;
    }
    if k > 1 {
        legend(c)?;
    }
    Ok(())
}

/// Fault latency over time, from a trace written with `--trace`.
fn timeline_plot(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadInput(format!("--trace {}: cannot read: {e}", path.display())))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        BadInput(format!(
            "--trace {}: not a vmmu trace (Chrome trace JSON): {e}",
            path.display()
        ))
    })?;
    let events = v["traceEvents"].as_array().cloned().unwrap_or_default();
    let faults: Vec<(String, f64, f64)> = events
        .iter()
        .filter(|e| e["cat"] == "fault" && e["ph"] == "X")
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.trim_start_matches("fault:").to_string(),
                e["ts"].as_f64()? / 1000.0,
                e["dur"].as_f64()?.max(0.001),
            ))
        })
        .collect();
    if faults.is_empty() {
        anyhow::bail!(BadInput(format!(
            "--trace {}: the trace has no fault events",
            path.display()
        )));
    }
    // At most 20,000 points: every n-th fault, evenly over the run.
    let step = faults.len().div_ceil(20_000).max(1);
    let tmax = faults.iter().map(|f| f.1).fold(0.0, f64::max).max(0.001) * 1.02;
    let dmax = faults.iter().map(|f| f.2).fold(0.0, f64::max).max(0.01) * 2.0;
    let mut kinds: Vec<String> = faults.iter().map(|f| f.0.clone()).collect();
    kinds.sort();
    kinds.dedup();
    svg(|root| {
        let mut c = ChartBuilder::on(&root)
            .caption(
                format!(
                    "fault latency over time ({} faults{})",
                    faults.len(),
                    if step > 1 {
                        format!(", every {step}th shown")
                    } else {
                        String::new()
                    }
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..tmax, (0.001f64..dmax).log_scale())
            .map_err(plot_err)?;
        c.configure_mesh()
            .x_desc("time since start, ms")
            .y_desc("fault call, µs")
            .draw()
            .map_err(plot_err)?;
        for (i, kind) in kinds.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            c.draw_series(
                faults
                    .iter()
                    .step_by(step)
                    .filter(|f| &f.0 == kind)
                    .map(|f| Circle::new((f.1, f.2), 2, color.filled())),
            )
            .map_err(plot_err)?
            .label(kind.as_str())
            .legend(move |(x, y)| Circle::new((x + 6, y), 3, color.filled()));
        }
        legend(&mut c)?;
        Ok(())
    })
}

/// `*_ns` members of `v` as `(name, ms)`.
fn phases(v: &Value) -> Vec<(String, f64)> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, x)| {
                    let name = k.strip_suffix("_ns")?;
                    Some((name.to_string(), x.as_u64()? as f64 / 1e6))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn figure(out: &mut String, svg: String, caption: &str) {
    let _ = write!(
        out,
        "<figure class=\"plot\">{svg}<figcaption>{}</figcaption></figure>",
        esc(caption)
    );
}

fn run_section(out: &mut String, i: usize, r: &Run) -> anyhow::Result<()> {
    let v = &r.v;
    let scenario = v["scenario"].as_str().unwrap_or("?");
    let command = v["config"]["command"].as_str().unwrap_or(scenario);
    let _ = write!(
        out,
        "<section><h2>{}. {} <small>({})</small></h2>",
        i + 1,
        esc(command),
        esc(&r.file)
    );
    out.push_str("<div class=\"cols\"><div><h3>Configuration</h3>");
    kv_table(out, &v["config"], "", &[]);
    out.push_str("</div><div><h3>Summary</h3>");
    kv_table(
        out,
        v,
        "",
        &[
            "config",
            "counters",
            "fault_latency",
            "vmmu",
            "kvm",
            "baseline",
        ],
    );
    out.push_str("</div></div>");
    if let Some(lat) = v["fault_latency"].as_object().filter(|m| !m.is_empty()) {
        figure(
            out,
            latency_plot("fault latency by outcome", lat)?,
            "Time of each page_fault call by what it came to (log scales).",
        );
    }
    if let Some(causes) = v["retries_by_cause"].as_object() {
        let groups: Vec<(String, Vec<f64>)> = causes
            .iter()
            .map(|(k, n)| (k.clone(), vec![n.as_f64().unwrap_or(0.0)]))
            .collect();
        if groups.iter().any(|g| g.1[0] > 0.0) {
            figure(
                out,
                bar_plot("retries by cause", "retries", &["retries".into()], &groups)?,
                "Why faults were retried.",
            );
        }
    }
    // A benchmark: its phases, side by side with the other sides it ran.
    let sides: Vec<(&str, &Value)> = ["vmmu", "kvm", "baseline"]
        .iter()
        .filter_map(|s| v.get(*s).filter(|x| x.is_object()).map(|x| (*s, x)))
        .collect();
    if !sides.is_empty() {
        let first = phases(sides[0].1);
        let groups: Vec<(String, Vec<f64>)> = first
            .iter()
            .map(|(name, _)| {
                let vals = sides
                    .iter()
                    .map(|(_, s)| {
                        phases(s)
                            .iter()
                            .find(|(n, _)| n == name)
                            .map_or(0.0, |x| x.1)
                    })
                    .collect();
                (name.clone(), vals)
            })
            .collect();
        let names: Vec<String> = sides.iter().map(|s| s.0.to_string()).collect();
        figure(
            out,
            bar_plot(
                if sides.len() > 1 {
                    "phases side by side"
                } else {
                    "phases"
                },
                "ms",
                &names,
                &groups,
            )?,
            "The same phases measured on each side in this one run.",
        );
    } else {
        let p = phases(v);
        if !p.is_empty() {
            let groups: Vec<(String, Vec<f64>)> =
                p.into_iter().map(|(n, ms)| (n, vec![ms])).collect();
            figure(
                out,
                bar_plot("phases", "ms", &["time".into()], &groups)?,
                "Time of each phase of the run.",
            );
        }
    }
    out.push_str("</section>");
    Ok(())
}

/// Several runs: their phases and fixed-fault latency side by side.
fn comparison(out: &mut String, runs: &[Run]) -> anyhow::Result<()> {
    let names: Vec<String> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{}. {}", i + 1, r.v["scenario"].as_str().unwrap_or("?")))
        .collect();
    out.push_str("<section><h2>Comparison</h2>");
    let all: Vec<Vec<(String, f64)>> = runs.iter().map(|r| phases(&r.v)).collect();
    let common: Vec<String> = all
        .first()
        .map(|p| {
            p.iter()
                .map(|x| x.0.clone())
                .filter(|n| all.iter().all(|q| q.iter().any(|y| &y.0 == n)))
                .collect()
        })
        .unwrap_or_default();
    if !common.is_empty() {
        let groups: Vec<(String, Vec<f64>)> = common
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    all.iter()
                        .map(|q| q.iter().find(|y| &y.0 == n).map_or(0.0, |y| y.1))
                        .collect(),
                )
            })
            .collect();
        figure(
            out,
            bar_plot("phases, run by run", "ms", &names, &groups)?,
            "The phases every run has, one bar per run.",
        );
    }
    let lat: Vec<(String, Vec<f64>)> = ["p50_ns", "p90_ns", "p99_ns"]
        .iter()
        .map(|q| {
            (
                format!("fixed {}", q.trim_end_matches("_ns")),
                runs.iter()
                    .map(|r| r.v["fault_latency"]["fixed"][q].as_f64().unwrap_or(0.0))
                    .collect(),
            )
        })
        .collect();
    if lat.iter().any(|g| g.1.iter().any(|x| *x > 0.0)) {
        figure(
            out,
            bar_plot("fixed-fault latency, run by run", "ns", &names, &lat)?,
            "Percentiles of the fault calls that mapped memory.",
        );
    }
    out.push_str("<table><tr><th>run</th><th>file</th><th>faults</th><th>retries</th><th>violations</th></tr>");
    for (n, r) in names.iter().zip(runs) {
        let g = |k: &str| scalar(&r.v[k]).unwrap_or_else(|| "-".into());
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(n),
            esc(&r.file),
            g("faults"),
            g("retries"),
            g("violations")
        );
    }
    out.push_str("</table></section>");
    Ok(())
}

/// Build the page.
pub fn render(inputs: &[PathBuf], trace: Option<&Path>) -> anyhow::Result<String> {
    let mut runs = Vec::new();
    for p in inputs {
        runs.extend(read_runs(p)?);
    }
    if runs.is_empty() {
        anyhow::bail!(BadInput(
            "no runs to report: give at least one RUN.json".into()
        ));
    }
    let mut out = String::new();
    out.push_str(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>vmmu report</title><style>\
         body{font-family:sans-serif;margin:24px;color:#222}\
         table{border-collapse:collapse;font-size:13px;margin:6px 0}\
         th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}\
         th{background:#f3f3f3;font-weight:normal}\
         .cols{display:flex;gap:24px;flex-wrap:wrap}.cols>div{max-height:420px;overflow:auto}\
         figure.plot{margin:12px 0}figcaption{font-size:13px;color:#555}\
         section{border-top:2px solid #ddd;margin-top:20px}\
         </style></head><body><h1>vmmu report</h1>",
    );
    let _ = write!(
        out,
        "<p>{} run{} from {}.</p>",
        runs.len(),
        if runs.len() == 1 { "" } else { "s" },
        esc(&inputs
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "))
    );
    for (i, r) in runs.iter().enumerate() {
        run_section(&mut out, i, r)?;
    }
    if let Some(t) = trace {
        out.push_str("<section><h2>Timeline</h2>");
        figure(
            &mut out,
            timeline_plot(t)?,
            &format!("Every recorded fault of {}, by outcome.", t.display()),
        );
        out.push_str("</section>");
    }
    if runs.len() > 1 {
        comparison(&mut out, &runs)?;
    }
    out.push_str("</body></html>\n");
    Ok(out)
}

/// `vmmu report`.
pub fn run(inputs: &[PathBuf], trace: Option<&Path>, output: &Path) -> anyhow::Result<i32> {
    let page = render(inputs, trace)?;
    std::fs::write(output, page)
        .map_err(|e| BadInput(format!("-o {}: cannot write: {e}", output.display())))?;
    eprintln!("wrote {}", output.display());
    Ok(0)
}
