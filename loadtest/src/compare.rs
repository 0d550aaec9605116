//! `relay-loadtest compare A.json B.json`: two JSON reports side by side, as a text
//! table (stdout) and, with `--html`, a page with the table and overlaid plots. Each
//! report contributes its main step (the best passing step of a search, else the
//! last); the last column is B's figure over A's.

use std::fmt::Write as _;

use crate::report::{Report, StepReport, fmt_bytes, fmt_rate, fmt_us, group};

/// One line of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    pub a: String,
    pub b: String,
    /// B / A, or empty when it means nothing.
    pub ratio: String,
}

fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && b.is_finite() {
        format!("{:.2}×", b / a)
    } else {
        String::new()
    }
}

/// The figures compared, in order.
pub fn rows(a: &Report, b: &Report) -> Vec<Row> {
    let mut out = Vec::new();
    let mut text = |name: &str, f: &dyn Fn(&Report) -> String| {
        out.push(Row {
            name: name.into(),
            a: f(a),
            b: f(b),
            ratio: String::new(),
        })
    };
    text("name", &|r| r.name.clone());
    text("target", &|r| {
        format!("{} {}", r.target.kind, r.target.controllers)
    });
    text("verdict", &|r| r.verdict.headline());
    text("pattern", &|r| r.pattern.to_string());
    text("connections", &|r| {
        format!(
            "{}/{}",
            group(r.connect.established),
            group(r.connect.planned)
        )
    });
    if let Some((fa, fb)) = a.find_max.as_ref().zip(b.find_max.as_ref()) {
        let best = |f: &crate::report::FindMaxReport| f.best.map_or(0.0, |o| o.rate);
        out.push(Row {
            name: format!("find-max ({})", fa.by),
            a: fmt_rate(best(fa)),
            b: fmt_rate(best(fb)),
            ratio: ratio(best(fa), best(fb)),
        });
    }
    let (Some(sa), Some(sb)) = (a.main_step(), b.main_step()) else {
        return out;
    };
    let mut num = |name: &str, f: &dyn Fn(&StepReport) -> f64, show: &dyn Fn(f64) -> String| {
        let (x, y) = (f(sa), f(sb));
        out.push(Row {
            name: name.into(),
            a: show(x),
            b: show(y),
            ratio: ratio(x, y),
        });
    };
    let us = |v: f64| fmt_us(v as u64);
    let rate = |v: f64| fmt_rate(v);
    num("rate (msg/s)", &|s| s.total_rate, &rate);
    num("received/s", &|s| s.receive_rate, &rate);
    num("loss %", &|s| s.loss_ratio * 100.0, &|v| format!("{v:.4}"));
    num("p50", &|s| s.latency.p50_us as f64, &us);
    num("p90", &|s| s.latency.p90_us as f64, &us);
    num("p99", &|s| s.latency.p99_us as f64, &us);
    num("p99.9", &|s| s.latency.p999_us as f64, &us);
    num("max", &|s| s.latency.max_us as f64, &us);
    num(
        "p50 from actual send",
        &|s| s.latency_from_sent.p50_us as f64,
        &us,
    );
    num(
        "p99 from actual send",
        &|s| s.latency_from_sent.p99_us as f64,
        &us,
    );
    num("send lag p99", &|s| s.send_lag.p99_us as f64, &us);
    num(
        "server CPU-µs/msg",
        &|s| s.server.map_or(0.0, |x| x.cpu_us_per_msg),
        &|v| format!("{v:.2}"),
    );
    num(
        "server CPU % of a core",
        &|s| s.server.map_or(0.0, |x| x.cpu_percent),
        &|v| format!("{v:.0}"),
    );
    num(
        "server RSS",
        &|s| s.server.map_or(0.0, |x| x.rss_bytes as f64),
        &|v| fmt_bytes(v),
    );
    num(
        "generator % of machine",
        &|s| s.generator.map_or(0.0, |x| x.machine_percent),
        &|v| format!("{v:.0}"),
    );
    out
}

/// The comparison as a text table.
pub fn text(a: &Report, b: &Report, la: &str, lb: &str) -> String {
    let rows = rows(a, b);
    let w0 = rows
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(6)
        .max(6);
    let w1 = rows
        .iter()
        .map(|r| r.a.chars().count())
        .chain([la.chars().count() + 3])
        .max()
        .unwrap_or(1);
    let w2 = rows
        .iter()
        .map(|r| r.b.chars().count())
        .chain([lb.chars().count() + 3])
        .max()
        .unwrap_or(1);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<w0$}  {:<w1$}  {:<w2$}  B / A",
        "figure",
        format!("A: {la}"),
        format!("B: {lb}")
    );
    for r in rows {
        let _ = writeln!(
            o,
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            r.name, r.a, r.b, r.ratio
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn the_table_pairs_figures_and_ratios() {
        let a = sample_report();
        let mut b = sample_report();
        b.steps[0].latency.p50_us = a.steps[0].latency.p50_us * 3;
        let rows = rows(&a, &b);
        let p50 = rows.iter().find(|r| r.name == "p50").unwrap();
        assert_eq!(p50.ratio, "3.00×");
        let t = text(&a, &b, "a.json", "b.json");
        assert!(t.starts_with("figure"), "{t}");
        assert!(t.contains("A: a.json") && t.contains("B: b.json"));
        assert!(
            t.lines()
                .any(|l| l.starts_with("p50") && l.ends_with("3.00×")),
            "{t}"
        );
    }
}
