//! Reports: a markdown table (median and min–max over repeats, and each
//! target's added latency as a ratio of the best peer's), and an SVG plot
//! of the round-trip percentile curves.

use std::fmt::Write;

use crate::load::QUANTILES;
use crate::{Params, Run, TargetResult};

/// `YYYYMMDD-HHMMSS` in UTC, without a date library.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

type Pick = fn(&Run) -> Option<f64>;

/// The figures in the table: (column title, accessor, decimals).
fn figures() -> Vec<(&'static str, Pick, usize)> {
    vec![
        (
            "setup p50 ms",
            |r| r.setup.as_ref().map(|s| s.total.p50 / 1e3),
            2,
        ),
        ("rtt p50 µs", |r| r.rtt.as_ref().map(|s| s.p50), 1),
        ("rtt p99 µs", |r| r.rtt.as_ref().map(|s| s.p99), 1),
        (
            "rtt-concurrent p99 µs",
            |r| r.rtt_concurrent.as_ref().map(|s| s.p99),
            1,
        ),
        ("ops/s", |r| r.ops_per_sec, 0),
        (
            "rtt-concurrent (8) p99 µs",
            |r| r.rtt_concurrent_small.as_ref().map(|s| s.p99),
            1,
        ),
        ("ops/s (8)", |r| r.ops_per_sec_small, 0),
        ("machine CPU µs/rtt", |r| r.machine_cpu_us_per_rtt, 1),
        ("machine CPU µs/op (N)", |r| r.machine_cpu_us_per_op, 1),
        ("idle entries/rtt", |r| r.idle_entries_per_rtt, 2),
        ("TLS bulk Gbit/s", |r| r.bulk_gbit, 2),
        ("raw bulk Gbit/s", |r| r.raw_bulk_gbit, 2),
        ("raw rtt p50 µs", |r| r.raw_rtt.as_ref().map(|s| s.p50), 1),
        ("proxy CPU s/GiB", |r| r.proxy_cpu_s_per_gib, 3),
        ("machine CPU s/GiB", |r| r.machine_cpu_s_per_gib, 3),
        ("proxy CPU ms/conn", |r| r.proxy_cpu_ms_per_conn, 3),
        ("RSS KiB/idle conn", |r| r.idle_rss_kib_per_conn, 1),
        ("fds/idle conn", |r| r.idle_fds_per_conn, 1),
        ("idle proxy CPU %", |r| r.idle_cpu_pct, 2),
    ]
}

fn stats(t: &TargetResult, pick: Pick) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = t.runs.iter().filter_map(pick).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some((v[0], v[v.len() / 2], v[v.len() - 1]))
}

/// The markdown report.
/// Said at the top and the bottom of a `--smoke` run's report.
pub const SMOKE_NOTE: &str = "**Smoke run: tiny counts that only check the harness and every target work. These numbers are not measurements; see docs/performance.md.**";

pub fn markdown(results: &[TargetResult], p: &Params, command: &str, clean: bool) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# splicegate-bench results\n");
    if p.smoke {
        let _ = writeln!(o, "{SMOKE_NOTE}\n");
    }
    if !clean {
        let _ = writeln!(
            o,
            "**This run had errors: see the notes below; affected figures are incomplete.**\n"
        );
    }
    let _ = writeln!(o, "Command: `{command}`\n");
    if p.mode == "terminate" {
        let _ = writeln!(
            o,
            "Terminate mode: TLS ends at the proxy, which reads the HTTP request and opens TLS to the agent (not verified, for both proxies); every connection is a WebSocket upgrade and the tests run over the upgraded stream. Setup includes the upgrade exchange; CPU per GiB is measured on the TLS bulk transfer.\n"
        );
    }
    let _ = writeln!(
        o,
        "{} repeat(s), targets interleaved; setup {} conns, rtt {} round trips of 64 B, {} (and {}) concurrent conns for {} s, TLS bulk {} MiB, raw bulk {} MiB, {} idle conns (each after one round trip) watched for {} s. (N) = {} connections. Cells: median (min–max).\n",
        p.repeats,
        p.setup_conns,
        p.rtt_rounds,
        p.concurrent_conns,
        p.concurrent_small,
        p.concurrent_secs,
        p.bulk_bytes >> 20,
        p.raw_bulk_bytes >> 20,
        p.idle_conns,
        p.idle_secs,
        p.concurrent_conns
    );
    let figs = figures();
    let _ = write!(o, "| target |");
    for (title, _, _) in &figs {
        let _ = write!(o, " {title} |");
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "|---|{}", "---|".repeat(figs.len()));
    for t in results.iter().filter(|t| !t.runs.is_empty()) {
        let _ = write!(o, "| {} |", t.name);
        for (_, pick, dec) in &figs {
            match stats(t, *pick) {
                None => {
                    let _ = write!(o, " – |");
                }
                Some((lo, med, hi)) if t.runs.len() > 1 => {
                    let _ = write!(o, " {med:.dec$} ({lo:.dec$}–{hi:.dec$}) |");
                }
                Some((_, med, _)) => {
                    let _ = write!(o, " {med:.dec$} |");
                }
            }
        }
        let _ = writeln!(o);
    }

    // Added latency over direct, as a ratio of the best peer's.
    let direct = results.iter().find(|t| t.name == "direct");
    let peers: Vec<&TargetResult> = results
        .iter()
        .filter(|t| t.name.starts_with("haproxy") || t.name.starts_with("nginx"))
        .collect();
    if let Some(direct) = direct {
        let _ = writeln!(o, "\nAdded over direct (median), and as a multiple of the best HAProxy/nginx variant's added figure:\n");
        let added: Vec<(&str, Pick)> = vec![
            ("setup p50 ms", |r| {
                r.setup.as_ref().map(|s| s.total.p50 / 1e3)
            }),
            ("rtt p50 µs", |r| r.rtt.as_ref().map(|s| s.p50)),
            ("rtt p99 µs", |r| r.rtt.as_ref().map(|s| s.p99)),
            ("raw rtt p50 µs", |r| r.raw_rtt.as_ref().map(|s| s.p50)),
            ("machine CPU s/GiB", |r| r.machine_cpu_s_per_gib),
        ];
        let _ = write!(o, "| target |");
        for (title, _) in &added {
            let _ = write!(o, " added {title} | × best peer |");
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "|---|{}", "---|---|".repeat(added.len()));
        for t in results
            .iter()
            .filter(|t| !t.runs.is_empty() && t.name != "direct")
        {
            let _ = write!(o, "| {} |", t.name);
            for (_, pick) in &added {
                let base = stats(direct, *pick).map(|s| s.1);
                let mine = stats(t, *pick).map(|s| s.1);
                let best = peers
                    .iter()
                    .filter_map(|p| Some(stats(p, *pick)?.1 - base?))
                    .fold(None, |acc: Option<f64>, x| {
                        Some(acc.map_or(x, |a| a.min(x)))
                    });
                match (mine, base) {
                    (Some(m), Some(b)) => {
                        let add = m - b;
                        let ratio = best
                            .filter(|b| *b > 0.0)
                            .map_or("–".to_owned(), |bp| format!("{:.2}", add / bp));
                        let _ = write!(o, " {add:+.2} | {ratio} |");
                    }
                    _ => {
                        let _ = write!(o, " – | – |");
                    }
                }
            }
            let _ = writeln!(o);
        }
    }

    let notes: Vec<String> = results
        .iter()
        .flat_map(|t| {
            let status = (t.status != "ok").then(|| format!("- {}: {}", t.name, t.status));
            status.into_iter().chain(t.runs.iter().flat_map(move |r| {
                r.errors
                    .iter()
                    .map(move |e| format!("- {} (repeat {}): {e}", t.name, r.repeat))
            }))
        })
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(o, "\nNotes:\n\n{}", notes.join("\n"));
    }
    o
}

/// Round-trip percentile curves (TLS rtt test, median per percentile over
/// repeats), one line per target.
pub fn svg(results: &[TargetResult]) -> String {
    let curves: Vec<(String, Vec<f64>)> = results
        .iter()
        .filter_map(|t| {
            let runs: Vec<&Vec<f64>> = t
                .runs
                .iter()
                .filter_map(|r| r.rtt.as_ref().map(|s| &s.curve))
                .collect();
            if runs.is_empty() {
                return None;
            }
            let med = (0..QUANTILES.len())
                .map(|i| {
                    let mut v: Vec<f64> = runs.iter().map(|c| c[i]).collect();
                    v.sort_by(|a, b| a.total_cmp(b));
                    v[v.len() / 2]
                })
                .collect();
            Some((t.name.clone(), med))
        })
        .collect();
    plot(
        "64-byte TLS round trip through each target: latency by percentile",
        &curves,
        false,
    )
}

/// A latency-by-percentile plot: one line per `(name, values at
/// QUANTILES in µs)`, on a linear or logarithmic latency axis.
pub fn plot(title: &str, curves: &[(String, Vec<f64>)], log: bool) -> String {
    let (w, h, left, bottom, top, right) = (820.0, 480.0, 70.0, 50.0, 30.0, 200.0);
    let values = || curves.iter().flat_map(|(_, c)| c.iter().copied());
    let ymax = values().fold(1.0_f64, f64::max) * 1.1;
    let ymin = if log {
        // A decade boundary at or below the smallest value.
        10f64.powf(values().fold(ymax, f64::min).max(0.1).log10().floor())
    } else {
        0.0
    };
    let (pw, ph) = (w - left - right, h - top - bottom);
    let x = |i: usize| left + pw * i as f64 / (QUANTILES.len() - 1) as f64;
    let y = |v: f64| {
        let f = if log {
            (v.max(ymin).log10() - ymin.log10()) / (ymax.log10() - ymin.log10())
        } else {
            v / ymax
        };
        top + ph * (1.0 - f)
    };
    let colors = [
        "#444444", "#d62728", "#ff7f0e", "#1f77b4", "#17becf", "#2ca02c", "#9467bd", "#8c564b",
    ];
    let mut o = String::new();
    let _ = writeln!(o, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">");
    let _ = writeln!(o, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let title = escape(title);
    let _ = writeln!(
        o,
        "<text x=\"{left}\" y=\"18\" font-size=\"14\">{title}</text>"
    );
    let ticks: Vec<f64> = if log {
        let mut t = Vec::new();
        let mut v = ymin;
        while v <= ymax {
            t.push(v);
            v *= 10.0;
        }
        t
    } else {
        (0..=5).map(|k| ymax * f64::from(k) / 5.0).collect()
    };
    for v in ticks {
        let (x2, yv, tx, ty) = (left + pw, y(v), left - 6.0, y(v) + 4.0);
        let _ = writeln!(
            o,
            "<line x1=\"{left}\" x2=\"{x2}\" y1=\"{yv:.1}\" y2=\"{yv:.1}\" stroke=\"#dddddd\"/><text x=\"{tx}\" y=\"{ty:.1}\" text-anchor=\"end\">{v:.0} µs</text>"
        );
    }
    for (i, q) in QUANTILES.iter().enumerate() {
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">p{}</text>",
            x(i),
            h - bottom + 18.0,
            q * 100.0
        );
    }
    for (n, (name, c)) in curves.iter().enumerate() {
        let color = colors[n % colors.len()];
        let pts: Vec<String> = c
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = writeln!(
            o,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        );
        let ly = top + 16.0 * n as f64 + 10.0;
        let name = escape(name);
        let _ = writeln!(o, "<line x1=\"{0}\" x2=\"{1}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"/><text x=\"{2}\" y=\"{3}\">{name}</text>", w - right + 15.0, w - right + 35.0, w - right + 40.0, ly + 4.0);
    }
    let _ = writeln!(o, "</svg>");
    o
}

/// The median of `v` (the upper one of an even count), None when empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Text for an SVG text node (addresses and names come from the command line).
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
