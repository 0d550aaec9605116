//! The HTML report: the summary as tables and the run as inline SVG plots drawn with
//! plotters' SVG backend: latency percentile curves (log-scaled percentile axis, as
//! HdrHistogram plots them), throughput over time, connect-time percentiles, server
//! RSS over time, and for a capacity search p99 against rate with the SLO line.

use std::fmt::Write as _;

use plotters::prelude::*;

use crate::report::{Report, StepReport, fmt_bytes, fmt_rate, fmt_us, group};

/// A plot failed to draw.
#[derive(Debug, thiserror::Error)]
#[error("plot {title}: {message}")]
pub struct PlotError {
    title: String,
    message: String,
}

/// One named line of a chart.
struct Series {
    name: String,
    points: Points,
}

/// How the x axis is labelled.
#[derive(Clone, Copy)]
enum XAxis {
    /// x = -log10(1 - q): labels are percentiles.
    Percentile,
    /// Plain numbers.
    Linear,
}

/// Percentile (0..=100) to the log-scaled x position.
pub fn percentile_x(p: f64) -> f64 {
    let rest = (1.0 - p / 100.0).max(1e-6);
    -rest.log10()
}

fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let digits = (x.round() as i32 - 2).max(0) as usize;
    format!("{p:.digits$}%")
}

fn line_chart(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    axis: XAxis,
    series: &[Series],
    hline: Option<(f64, &str)>,
) -> Result<String, PlotError> {
    let err = |e: String| PlotError {
        title: title.to_string(),
        message: e,
    };
    let mut x_max: f64 = 0.0;
    let mut y_max: f64 = 0.0;
    for s in series {
        for &(x, y) in &s.points {
            x_max = x_max.max(x);
            y_max = y_max.max(y);
        }
    }
    if let Some((y, _)) = hline {
        y_max = y_max.max(y);
    }
    if let XAxis::Percentile = axis {
        x_max = x_max.ceil().max(1.0);
    }
    let x_max = if x_max > 0.0 { x_max * 1.02 } else { 1.0 };
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (860, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(|e| err(e.to_string()))?;
        let fmt_x = move |x: &f64| match axis {
            XAxis::Percentile => percentile_label(*x),
            XAxis::Linear => axis_number(*x),
        };
        let fmt_y = |y: &f64| axis_number(*y);
        let x_labels = match axis {
            XAxis::Percentile => x_max.floor() as usize + 1,
            XAxis::Linear => 10,
        };
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_labels(x_labels)
            .x_label_formatter(&fmt_x)
            .y_label_formatter(&fmt_y)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| err(e.to_string()))?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        if let Some((y, name)) = hline {
            chart
                .draw_series(LineSeries::new(
                    vec![(0.0, y), (x_max, y)],
                    RED.stroke_width(1),
                ))
                .map_err(|e| err(e.to_string()))?
                .label(name.to_string())
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(1)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(svg)
}

/// An axis tick: thousands separators for large values, few decimals for small ones.
fn axis_number(x: f64) -> String {
    if x.abs() >= 100.0 {
        group(x.round() as u64)
    } else if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        let t = format!("{x:.2}");
        t.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn curve_ms(curve: &[(f64, u64)]) -> Vec<(f64, f64)> {
    curve
        .iter()
        .map(|&(p, us)| (percentile_x(p), us as f64 / 1000.0))
        .collect()
}

/// Every step with the seconds before it, the steps laid end to end (a step
/// lasts as many seconds as it has throughput readings, at least one).
fn end_to_end(r: &Report) -> impl Iterator<Item = (&StepReport, f64)> {
    r.steps.iter().scan(0.0, |offset, s| {
        let at = *offset;
        *offset += s.throughput.len().max(1) as f64;
        Some((s, at))
    })
}

/// (x, y) points of one line.
type Points = Vec<(f64, f64)>;

/// Messages sent and received in each second, steps laid end to end.
fn throughput(r: &Report) -> (Points, Points) {
    let mut sent = Vec::new();
    let mut received = Vec::new();
    for (s, offset) in end_to_end(r) {
        for sec in &s.throughput {
            sent.push((offset + sec.t as f64, sec.sent as f64));
            received.push((offset + sec.t as f64, sec.received as f64));
        }
    }
    (sent, received)
}

/// The SLO's p99 as a horizontal line, when there is one.
fn slo_line(r: &Report) -> Option<(f64, &'static str)> {
    (r.slo.p99_ms > 0.0).then_some((r.slo.p99_ms, "SLO p99"))
}

/// p50 and p99 of every step's latency-over-time buckets, steps laid end to end.
fn latency_over_time(r: &Report) -> Vec<Series> {
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for (s, offset) in end_to_end(r) {
        for x in &s.latency_over_time {
            p50.push((offset + x.t_s, x.p50_us as f64 / 1000.0));
            p99.push((offset + x.t_s, x.p99_us as f64 / 1000.0));
        }
    }
    if p50.is_empty() {
        return Vec::new();
    }
    vec![
        Series {
            name: "p50".into(),
            points: p50,
        },
        Series {
            name: "p99".into(),
            points: p99,
        },
    ]
}

/// Two reports side by side: a table of their main figures and overlaid plots.
pub fn render_compare(a: &Report, b: &Report, la: &str, lb: &str) -> Result<String, PlotError> {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>relay-loadtest compare</title>\n<style>\
         body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;margin:8px 0 18px}}\
         td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} th{{background:#f3f3f3}}\
         td:first-child,th:first-child{{text-align:left}}</style></head><body>\n<h1>relay-loadtest: {} vs {}</h1>\n",
        esc(la),
        esc(lb)
    );
    h.push_str("<table><tr><th>figure</th>");
    let _ = writeln!(
        h,
        "<th>A: {}</th><th>B: {}</th><th>B / A</th></tr>",
        esc(la),
        esc(lb)
    );
    for row in crate::compare::rows(a, b) {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&row.name),
            esc(&row.a),
            esc(&row.b),
            esc(&row.ratio)
        );
    }
    h.push_str("</table>\n");
    let curve = |r: &Report, label: &str| {
        r.main_step()
            .filter(|s| s.latency.count > 0)
            .map(|s| Series {
                name: format!("{label}: step {}", s.index),
                points: curve_ms(&s.latency.curve),
            })
    };
    let series: Vec<Series> = [curve(a, "A"), curve(b, "B")]
        .into_iter()
        .flatten()
        .collect();
    if !series.is_empty() {
        h.push_str(&line_chart(
            "Latency from intended send time",
            "percentile",
            "latency (ms)",
            XAxis::Percentile,
            &series,
            None,
        )?);
    }
    let mut over = Vec::new();
    for (r, l) in [(a, "A"), (b, "B")] {
        for mut x in latency_over_time(r) {
            x.name = format!("{l} {}", x.name);
            over.push(x);
        }
    }
    if !over.is_empty() {
        h.push_str(&line_chart(
            "Latency over time",
            "seconds",
            "latency (ms)",
            XAxis::Linear,
            &over,
            None,
        )?);
    }
    let tput: Vec<Series> = [(a, "A"), (b, "B")]
        .into_iter()
        .map(|(r, l)| Series {
            name: format!("{l} received"),
            points: throughput(r).1,
        })
        .collect();
    if tput.iter().any(|s| !s.points.is_empty()) {
        h.push_str(&line_chart(
            "Messages received per second",
            "seconds",
            "msg/s",
            XAxis::Linear,
            &tput,
            None,
        )?);
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

/// Renders the whole report as one self-contained HTML page.
pub fn render(r: &Report) -> Result<String, PlotError> {
    let mut h = String::new();
    let title = format!("relay-loadtest: {} \"{}\"", r.pattern, r.name);
    let _ = write!(
        h,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>\
         body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;margin:8px 0 18px}}\
         td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} th{{background:#f3f3f3}}\
         td:first-child,th:first-child{{text-align:left}} .note{{color:#a40}} pre{{background:#f7f7f7;padding:8px}}\
         .pass{{background:#e6f4e6;border:1px solid #6a6;padding:8px}} .fail{{background:#fbe9e9;border:1px solid #c66;padding:8px}}\
         </style></head><body>\n<h1>{t}</h1>\n",
        t = esc(&title)
    );
    let _ = writeln!(
        h,
        "<p class=\"{}\"><b>RESULT: {}</b></p>",
        if r.verdict.passed { "pass" } else { "fail" },
        esc(&r.verdict.headline())
    );
    if let Some(l) = &r.verdict.limited_by {
        let _ = writeln!(h, "<p class=\"fail\"><b>LIMIT:</b> {}</p>", esc(l));
    }
    if !r.description.is_empty() {
        let _ = writeln!(h, "<p>{}</p>", esc(&r.description));
    }
    if let Some(fm) = &r.find_max {
        let _ = writeln!(h, "<h2>Capacity</h2><p><b>{}</b></p>", esc(&fm.answer));
    }
    let t = &r.target;
    let _ = writeln!(
        h,
        "<h2>Run</h2><table><tr><th>target</th><td>{} ({}) / {} ({})</td></tr>\
         <tr><th>fleet</th><td>{} controllers, {} browsers, {} connections, {} senders</td></tr>\
         <tr><th>payload / heartbeat</th><td>{} B / {} s</td></tr>\
         <tr><th>workers × threads</th><td>{} × {}</td></tr>\
         <tr><th>connect</th><td>{}/{} established, {} failed, {}/s; p50 {} p99 {} max {}</td></tr></table>",
        esc(&t.controllers),
        esc(&t.controller_form),
        esc(&t.browsers),
        esc(&t.browser_form),
        group(r.fleet.controllers),
        group(r.fleet.browsers),
        group(r.fleet.connections),
        group(r.fleet.senders),
        r.fleet.payload_bytes,
        r.fleet.heartbeat_s,
        r.workers,
        r.threads_per_worker,
        group(r.connect.established),
        group(r.connect.planned),
        group(r.connect.failed),
        fmt_rate(r.connect.rate),
        fmt_us(r.connect.time.p50_us),
        fmt_us(r.connect.time.p99_us),
        fmt_us(r.connect.time.max_us),
    );
    if let Some(sp) = &t.spread {
        let per: Vec<String> = sp
            .targets
            .iter()
            .map(|c| format!("{} on {}", group(c.clients), esc(&c.url)))
            .collect();
        let _ = writeln!(
            h,
            "<p>targets: clients round-robin over {} targets ({}); {} of {} sender-recipient pairs cross targets</p>",
            sp.targets.len(),
            per.join(", "),
            group(sp.cross_pairs),
            group(sp.pairs)
        );
    }
    h.push_str(
        "<h2>Steps</h2><table><tr><th>step</th><th>rate msg/s</th><th>sent</th><th>received</th>\
         <th>loss</th><th>p50</th><th>p99</th><th>p99.9</th><th>max</th><th>tool send lag p99</th><th>server CPU-µs/msg</th><th>errors</th><th>SLO</th></tr>\n",
    );
    for s in &r.steps {
        let errors: u64 = s.errors.values().sum();
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.4}%</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            s.index,
            fmt_rate(s.total_rate),
            group(s.sent),
            group(s.received),
            s.loss_ratio * 100.0,
            fmt_us(s.latency.p50_us),
            fmt_us(s.latency.p99_us),
            fmt_us(s.latency.p999_us),
            fmt_us(s.latency.max_us),
            fmt_us(s.send_lag.p99_us),
            s.server
                .map(|x| format!("{:.2}", x.cpu_us_per_msg))
                .unwrap_or_else(|| "-".into()),
            group(errors),
            if s.passed {
                "pass".to_string()
            } else {
                format!("<b>fail</b>: {}", esc(&s.failures.join("; ")))
            }
        );
    }
    h.push_str("</table>\n");

    // Latency percentile curves: every step (a search shows how the tail grows).
    let series: Vec<Series> = r
        .steps
        .iter()
        .filter(|s| s.latency.count > 0)
        .map(|s| Series {
            name: format!("step {} @ {} msg/s", s.index, fmt_rate(s.total_rate)),
            points: curve_ms(&s.latency.curve),
        })
        .collect();
    if !series.is_empty() {
        h.push_str("<h2>Latency by percentile</h2>\n");
        h.push_str(&line_chart(
            "Latency from intended send time",
            "percentile",
            "latency (ms)",
            XAxis::Percentile,
            &series,
            slo_line(r),
        )?);
    }
    let hb: Vec<Series> = r
        .steps
        .iter()
        .filter(|s| s.heartbeat.count > 0)
        .map(|s| Series {
            name: format!("step {}", s.index),
            points: curve_ms(&s.heartbeat.curve),
        })
        .collect();
    if !hb.is_empty() {
        h.push_str("<h2>Heartbeat round trip by percentile</h2>\n");
        h.push_str(&line_chart(
            "Heartbeat round trip",
            "percentile",
            "round trip (ms)",
            XAxis::Percentile,
            &hb,
            None,
        )?);
    }

    // Throughput over time, the steps laid end to end.
    let (sent, received) = throughput(r);
    if !sent.is_empty() {
        h.push_str("<h2>Throughput over time</h2>\n");
        h.push_str(&line_chart(
            "Messages per second",
            "seconds (steps end to end)",
            "msg/s",
            XAxis::Linear,
            &[
                Series {
                    name: "sent".into(),
                    points: sent,
                },
                Series {
                    name: "received".into(),
                    points: received,
                },
            ],
            None,
        )?);
    }

    let over_time = latency_over_time(r);
    if !over_time.is_empty() {
        h.push_str("<h2>Latency over time</h2>\n");
        h.push_str(&line_chart(
            "Latency from intended send time, by arrival",
            "seconds (steps end to end)",
            "latency (ms)",
            XAxis::Linear,
            &over_time,
            slo_line(r),
        )?);
    }

    if r.connect.time.count > 0 {
        h.push_str("<h2>Connect time by percentile</h2>\n");
        h.push_str(&line_chart(
            "TCP connect + handshake",
            "percentile",
            "connect time (ms)",
            XAxis::Percentile,
            &[Series {
                name: format!("{} connections", group(r.connect.established)),
                points: curve_ms(&r.connect.time.curve),
            }],
            None,
        )?);
    }

    if let Some(fm) = &r.find_max {
        // (rate, p99 ms) of the steps `keep` chooses, by rate.
        let points = |keep: fn(&crate::findmax::Outcome) -> bool| {
            let mut v: Vec<(f64, f64)> = fm
                .steps
                .iter()
                .filter(|o| keep(o))
                .map(|o| (o.rate, o.p99_us as f64 / 1000.0))
                .collect();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            v
        };
        let all = points(|_| true);
        let pass = points(|o| o.passed);
        h.push_str("<h2>p99 against rate</h2>\n");
        h.push_str(&line_chart(
            "Capacity search",
            "total rate (msg/s)",
            "p99 (ms)",
            XAxis::Linear,
            &[
                Series {
                    name: "all steps".into(),
                    points: all,
                },
                Series {
                    name: "passing steps".into(),
                    points: pass,
                },
            ],
            Some((fm.slo_p99_ms, "SLO p99")),
        )?);
    }

    if let Some(sv) = &r.server {
        let t0 = sv.samples.first().map(|s| s.t_ns).unwrap_or(0);
        let rss: Vec<(f64, f64)> = sv
            .samples
            .iter()
            .map(|s| {
                (
                    (s.t_ns - t0) as f64 / 1e9,
                    s.rss_bytes as f64 / (1024.0 * 1024.0),
                )
            })
            .collect();
        let _ = writeln!(
            h,
            "<h2>Server</h2><table><tr><th>pid</th><td>{} ({})</td></tr><tr><th>RSS before / connected / peak</th><td>{} / {} / {}</td></tr>\
             <tr><th>per connection</th><td>{}</td></tr><tr><th>CPU in all</th><td>{:.2} s</td></tr></table>",
            sv.pid,
            esc(&sv.found_by),
            fmt_bytes(sv.rss_before_bytes as f64),
            fmt_bytes(sv.rss_connected_bytes as f64),
            fmt_bytes(sv.rss_peak_bytes as f64),
            sv.bytes_per_connection
                .map(fmt_bytes)
                .unwrap_or_else(|| "-".into()),
            sv.cpu_total_s
        );
        if rss.len() > 1 {
            h.push_str(&line_chart(
                "Server resident memory",
                "seconds",
                "RSS (MiB)",
                XAxis::Linear,
                &[Series {
                    name: "RSS".into(),
                    points: rss,
                }],
                None,
            )?);
        }
        let pairs: Vec<(u64, u64)> = sv.samples.iter().map(|s| (s.t_ns, s.cpu_us)).collect();
        let mut cpu = vec![Series {
            name: "server".into(),
            points: crate::coordinator::cpu_series(&pairs),
        }];
        for w in r.generator.iter().chain(r.watched.iter()) {
            // Their readings start when the workers do, a moment after the server's.
            cpu.push(Series {
                name: w.name.clone(),
                points: w.cpu_over_time.clone(),
            });
        }
        if cpu[0].points.len() > 1 {
            h.push_str(&line_chart(
                "CPU over time",
                "seconds",
                "% of one core",
                XAxis::Linear,
                &cpu,
                None,
            )?);
        }
    }

    let l = &r.limits;
    let _ = writeln!(
        h,
        "<h2>Limits</h2><table><tr><th>open files (soft/hard)</th><td>{}/{}</td></tr>\
         <tr><th>connections per process</th><td>{}</td></tr><tr><th>ephemeral ports per source</th><td>{}</td></tr>\
         <tr><th>source addresses</th><td>{}</td></tr></table>",
        l.nofile_soft,
        l.nofile_hard,
        group(l.per_process_connections),
        group(l.ephemeral_ports),
        esc(&l.source_addrs.join(", "))
    );
    for n in &l.notes {
        let _ = writeln!(h, "<p class=\"note\">{}</p>", esc(&n.text));
    }
    if let Some(s) = r.main_step() {
        let table = crate::report::percentile_table(&s.latency_hdr);
        if !table.is_empty() {
            let _ = writeln!(
                h,
                "<h2>Percentiles (step {})</h2><pre>{}</pre>",
                s.index,
                esc(&table)
            );
        }
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn percentile_axis_labels() {
        assert_eq!(percentile_x(0.0), 0.0);
        assert!((percentile_x(99.0) - 2.0).abs() < 1e-9);
        assert!((percentile_x(100.0) - 6.0).abs() < 1e-9);
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        assert_eq!(axis_number(0.0), "0");
        assert_eq!(axis_number(0.25), "0.25");
        assert_eq!(axis_number(0.5), "0.5");
        assert_eq!(axis_number(20_000.0), "20,000");
    }

    #[test]
    fn the_page_has_its_plots_and_numbers() {
        let page = render(&sample_report()).unwrap();
        assert!(page.starts_with("<!doctype html>"));
        assert!(
            page.matches("<svg").count() >= 3,
            "latency, throughput, connect plots"
        );
        assert!(page.contains("Latency from intended send time"));
        assert!(page.contains("Messages per second"));
        assert!(page.contains("<td>998</td>"));
        assert!(
            page.contains("Latency over time"),
            "latency over time is plotted"
        );
        assert!(page.contains("RESULT: PASS"));
        assert!(
            page.contains("polyline") || page.contains("<path"),
            "lines are drawn"
        );
    }

    #[test]
    fn two_reports_compare_in_one_page() {
        let a = sample_report();
        let mut b = sample_report();
        b.steps[0].latency.p99_us *= 2;
        let page = render_compare(&a, &b, "relay", "mosquitto").unwrap();
        assert!(page.contains("relay vs mosquitto"));
        assert!(
            page.contains("A: step 1") && page.contains("B: step 1"),
            "overlaid curves"
        );
        assert!(page.contains("<td>p99</td>"));
        assert!(page.contains("2.00×"), "{page}");
    }

    #[test]
    fn text_is_escaped() {
        let mut r = sample_report();
        r.description = "<script>alert(1)</script>".into();
        let page = render(&r).unwrap();
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;"));
    }
}
