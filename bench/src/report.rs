//! Turns a suite run (the JSON from `suite::run`) into the Markdown report:
//! the machine, versions and exact command, then every figure with its ratio
//! to direct and to Traefik, and the detail that explains the headline
//! (which nodes served whom, what failed). Pure functions over JSON.

use serde_json::Value;
use std::fmt::Write;

pub const CONTENDERS: [&str; 5] = ["direct", "switchboard", "traefik", "nginx", "haproxy"];

/// One row of the headline table: a number found at `pointer` in each
/// contender's result of `workload`.
pub struct Metric {
    pub label: String,
    pub workload: String,
    pub pointer: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

fn metric(label: &str, workload: &str, pointer: &'static str, unit: &'static str, higher: bool) -> Metric {
    Metric { label: label.into(), workload: workload.into(), pointer, unit, higher_is_better: higher }
}

/// The headline metrics present in `doc`, in report order.
pub fn metrics(doc: &Value) -> Vec<Metric> {
    let mut m = vec![
        metric("Echo round trip p50", "echo_latency", "/latency/p50_us", "µs", false),
        metric("Echo round trip p90", "echo_latency", "/latency/p90_us", "µs", false),
        metric("Echo round trip p99", "echo_latency", "/latency/p99_us", "µs", false),
        metric("Echo round trip p99.9", "echo_latency", "/latency/p999_us", "µs", false),
        metric("Sequential Echo p50 (one WebSocket)", "echo_sequential", "/latency/p50_us", "µs", false),
        metric("Sequential Echo p99 (one WebSocket)", "echo_sequential", "/latency/p99_us", "µs", false),
        metric("Echo throughput (saturated)", "echo_throughput", "/messages_per_sec", "msg/s", true),
        metric("Connection setup rate", "connect_rate", "/connections_per_sec", "conn/s", true),
        metric("Connection setup p50", "connect_rate", "/setup_latency/p50_us", "µs", false),
        metric("GET /health rate", "http_health", "/requests_per_sec", "req/s", true),
        metric("GET /health p99", "http_health", "/latency/p99_us", "µs", false),
        metric("Fan-out deliveries", "fanout", "/deliveries_per_sec", "/s", true),
        metric("Fan-out delivery p99", "fanout", "/latency/p99_us", "µs", false),
        metric("Cookie-less long-polling sessions that worked", "sticky_longpolling", "/success_share", "share", true),
    ];
    // CPU per operation, in runs that measured it: the proxy's processes (for
    // direct, the node's), user and system time together, then the user part.
    for (what, workload) in [
        ("echoed message (saturated)", "echo_throughput"),
        ("connection setup", "connect_rate"),
        ("GET /health", "http_health"),
    ] {
        let measured = doc["results"][workload].as_object().is_some_and(|r| r.values().any(|v| v.get("cpu").is_some()));
        if measured {
            m.push(metric(&format!("CPU per {what}"), workload, "/cpu/us_per_op", "µs", false));
            m.push(metric(&format!("CPU per {what}, user part"), workload, "/cpu/user_us_per_op", "µs", false));
        }
    }
    for count in idle_counts(doc) {
        m.push(metric(
            &format!("Memory per idle WebSocket at {count}"),
            &format!("idle_{count}"),
            "/processes/0/bytes_per_connection",
            "B",
            false,
        ));
    }
    m
}

pub fn idle_counts(doc: &Value) -> Vec<u64> {
    doc["settings"]["idle_counts"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
}

/// The value of `m` for `contender`, if it was measured.
pub fn value(doc: &Value, m: &Metric, contender: &str) -> Option<f64> {
    doc["results"][&m.workload][contender].pointer(m.pointer)?.as_f64()
}

/// `a / b`, when both exist and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// A number for a table: thousands separated, shares as percentages.
pub fn format_value(v: f64, unit: &str) -> String {
    if unit == "share" {
        return format!("{:.0} %", v * 100.0);
    }
    let rounded = v.round() as i64;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    format!("{}{out} {unit}", if rounded < 0 { "-" } else { "" })
}

/// A count with thousands separated and no unit.
pub fn num(v: f64) -> String {
    format_value(v, "").trim_end().to_string()
}

pub fn format_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 10.0 => format!("{r:.0}×"),
        Some(r) => format!("{r:.2}×"),
        None => "–".into(),
    }
}

/// The headline table: one row per metric, one column per contender, each
/// cell the value with its ratios to direct and to Traefik.
pub fn headline_table(doc: &Value) -> String {
    let mut s =
        String::from("| metric | direct | switchboard | traefik | nginx | haproxy |\n|---|---|---|---|---|---|\n");
    for m in metrics(doc) {
        let direct = value(doc, &m, "direct");
        let traefik = value(doc, &m, "traefik");
        let _ =
            write!(s, "| {} ({}) |", m.label, if m.higher_is_better { "higher is better" } else { "lower is better" });
        for c in CONTENDERS {
            let v = value(doc, &m, c);
            let cell = match v {
                None => "failed".to_string(),
                Some(x) => {
                    let mut cell = format_value(x, m.unit);
                    let mut ratios = Vec::new();
                    if c != "direct" {
                        ratios.push(format!("{} direct", format_ratio(ratio(v, direct))));
                    }
                    if c != "traefik" {
                        ratios.push(format!("{} Traefik", format_ratio(ratio(v, traefik))));
                    }
                    if !ratios.is_empty() {
                        let _ = write!(cell, "<br>{}", ratios.join(", "));
                    }
                    cell
                }
            };
            let _ = write!(s, " {cell} |");
        }
        s.push('\n');
    }
    s
}

/// Discovery and failover, Switchboard and Traefik side by side.
pub fn failover_table(doc: &Value) -> String {
    let f = &doc["results"]["failover"];
    let mut s = String::from("| | switchboard | traefik | switchboard / traefik |\n|---|---|---|---|\n");
    let row = |label: &str, key: &str, unit: &str| {
        let (a, b) = (f["switchboard"][key].as_f64(), f["traefik"][key].as_f64());
        let cell = |v: Option<f64>| v.map(|x| format!("{x:.1} {unit}")).unwrap_or_else(|| "failed".into());
        format!("| {label} | {} | {} | {} |\n", cell(a), cell(b), format_ratio(ratio(a, b)))
    };
    s += &row("node start → first client routed to it (median)", "median_start_to_routed_ms", "ms");
    s += &row("`kill -9` → last client that failed (median)", "median_kill_to_last_failed_client_ms", "ms");
    let failed = |c: &str| {
        let total: u64 =
            f[c]["failed_clients_after_kill"].as_array().map(|a| a.iter().filter_map(Value::as_u64).sum()).unwrap_or(0);
        format!("{total} of {}", f[c]["clients_after_kill"].as_u64().unwrap_or(0))
    };
    let _ = writeln!(
        s,
        "| new clients that failed after the kill (all runs) | {} | {} | |",
        failed("switchboard"),
        failed("traefik")
    );
    s
}

fn details(doc: &Value) -> String {
    let r = &doc["results"];
    let mut s = String::new();
    let _ = writeln!(s, "### Where clients landed and what failed\n");
    let _ = writeln!(
        s,
        "| contender | fan-out receivers per node | cookie-less long-polling: worked per node | long-polling errors |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    for c in CONTENDERS {
        let spread = |v: &Value| {
            v.as_object()
                .map(|o| o.iter().map(|(k, n)| format!("{k}: {n}")).collect::<Vec<_>>().join(", "))
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "–".into())
        };
        let _ = writeln!(
            s,
            "| {c} | {} | {} | {} |",
            spread(&r["fanout"][c]["receivers_per_node"]),
            spread(&r["sticky_longpolling"][c]["nodes_used"]),
            spread(&r["sticky_longpolling"][c]["errors"]).replace('|', "\\|"),
        );
    }
    let _ = writeln!(s, "\n### Idle connections\n");
    let _ = writeln!(s, "| contender | connections | opened | failed | RSS before → loaded → after close (MiB) |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for count in idle_counts(doc) {
        for c in CONTENDERS {
            let v = &r[format!("idle_{count}")][c];
            let p = &v["processes"][0];
            let mib = |k: &str| p[k].as_f64().map(|x| format!("{:.1}", x / 1024.0)).unwrap_or_else(|| "?".into());
            let _ = writeln!(
                s,
                "| {c} | {count} | {} | {} | {} → {} → {} |",
                v["open"],
                v["failed"],
                mib("rss_before_kib"),
                mib("rss_loaded_kib"),
                mib("rss_after_close_kib")
            );
        }
    }
    let mut errors = String::new();
    if let Some(workloads) = r.as_object() {
        for (w, per) in workloads {
            for (c, v) in per.as_object().into_iter().flatten() {
                if let Some(e) = v["error"].as_str() {
                    let _ = writeln!(errors, "- {w} / {c}: {e}");
                }
            }
        }
    }
    if !errors.is_empty() {
        let _ = writeln!(s, "\n### Workloads that failed\n\n{errors}");
    }
    s
}

/// The whole report.
pub fn markdown(doc: &Value) -> String {
    let mut s = String::new();
    let _ =
        writeln!(s, "# Switchboard against Traefik, nginx and HAProxy ({} run)\n", doc["mode"].as_str().unwrap_or("?"));
    let _ = writeln!(
        s,
        "Measured {} on one machine, everything on loopback, in one run.",
        doc["date"].as_str().unwrap_or("?")
    );
    let _ = writeln!(s, "Absolute numbers move between runs on a shared 2-core VM; compare the ratios.\n");
    let _ = writeln!(s, "Command: `{}`\n", doc["command"].as_str().unwrap_or("?"));
    let m = &doc["machine"];
    let _ = writeln!(
        s,
        "Machine: {} CPUs ({}), {} memory, {}, open-files limit {}.\n",
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["memory"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["open_files_limit"]
    );
    let _ = writeln!(s, "Versions:\n");
    for (k, v) in doc["versions"].as_object().into_iter().flatten() {
        let _ = writeln!(s, "- {k}: {}", v.as_str().unwrap_or("?"));
    }
    let _ = writeln!(
        s,
        "\nThree Switchboard nodes behind every proxy; **direct** means clients connect to a node with no proxy. \
         Every client speaks SignalR JSON over WebSocket and, like a browser, carries cookies from negotiate to the \
         upgrade. Idle memory is measured on a freshly started instance of each contender (for direct, a fresh \
         node), so pools grown by earlier workloads do not hide it. CPU per operation is the user and system time \
         of the proxy's processes (for direct, of the node) over the workload, divided by the operations done; the \
         kernel's share of a socket operation is much the same for every proxy, so the user part is the proxy's own \
         cost. Switchboard's per-node admission (1,000 new connections a second per node by default) is off \
         here, so that the setup rate measures the proxy, not the setting; the storm runs with it on. \
         Settings of each workload are in \
         `results.json` (`settings`).\n"
    );
    let _ = writeln!(s, "## Headline\n\n{}", headline_table(doc));
    let _ = writeln!(s, "![Echo latency percentiles](latency.svg)\n\n![Memory per idle WebSocket](memory.svg)\n");
    let _ = writeln!(s, "## Discovery and failover (Switchboard's registry against Traefik's file provider)\n");
    let _ = writeln!(s, "{}", failover_table(doc));
    let ceiling = ceiling_section(doc);
    if !ceiling.is_empty() {
        let _ = writeln!(
            s,
            "{ceiling}\n![Fan-out ceiling](ceiling.svg)\n\n![Memory per connection at scale](connections.svg)\n"
        );
    }
    let _ = writeln!(s, "{}", details(doc));
    s
}

/// The cluster's ceiling: the fan-out steps up to the latency limit, and the
/// idle connections held on one node and through one balancer.
pub fn ceiling_section(doc: &Value) -> String {
    let r = &doc["results"];
    let mut s = String::new();
    let fan = &r["fanout_ceiling"];
    if let Some(steps) = fan["steps"].as_array() {
        let _ = writeln!(
            s,
            "## Fan-out ceiling (3 nodes, through the balancer)\n\nStep k: k × {} receivers, k senders at {}/s each; \
             stops after the first step whose delivery p99 passes {} ms or that missed over 1 % of its deliveries \
             (not received within 1 s of the last send). \
             CPU is in percent of one core over the sending window (this machine has {} cores in all).\n",
            doc["settings"]["fanout_ceiling"]["receivers_per_step"],
            fan["rate_per_sender"],
            fan["p99_limit_ms"],
            doc["machine"]["cpus"]
        );
        let names: Vec<String> = steps
            .first()
            .and_then(|st| st["cpu_percent_of_one_core"].as_object())
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        let _ = write!(s, "| receivers | senders | asked /s | delivered /s | missed | p50 | p99 |");
        for n in &names {
            let _ = write!(s, " CPU {n} |");
        }
        let _ = write!(s, "\n|{}\n", "---|".repeat(7 + names.len()));
        for st in steps {
            let asked = st["receivers"].as_f64().unwrap_or(0.0)
                * st["senders"].as_f64().unwrap_or(0.0)
                * st["rate_per_sender"].as_f64().unwrap_or(0.0);
            let lost = st["expected_deliveries"].as_f64().unwrap_or(0.0) - st["delivered"].as_f64().unwrap_or(0.0);
            let ms = |k: &str| st["latency"][k].as_f64().map_or("–".into(), |us| format!("{:.1} ms", us / 1000.0));
            let _ = write!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                st["receivers"],
                st["senders"],
                num(asked),
                num(st["deliveries_per_sec"].as_f64().unwrap_or(0.0)),
                num(lost.max(0.0)),
                ms("p50_us"),
                ms("p99_us")
            );
            for n in &names {
                let _ = write!(s, " {} % |", st["cpu_percent_of_one_core"][n]);
            }
            s.push('\n');
        }
        match (fan["last_within_limit"]["deliveries_per_sec"].as_f64(), fan["first_past_limit"].is_object()) {
            (Some(d), true) => {
                let _ =
                    writeln!(s, "\n**Ceiling: {} deliveries/s** within the limit; the next step passed it.\n", num(d));
            }
            (Some(d), false) => {
                let _ = writeln!(s, "\nEvery step stayed within the limit, up to {} deliveries/s.\n", num(d));
            }
            _ => {
                let _ = writeln!(s, "\nThe first step already passed the limit.\n");
            }
        }
    }
    for (key, title) in
        [("connections_node", "one node"), ("connections_balancer", "one balancer (two nodes behind it)")]
    {
        let Some(points) = r[key]["points"].as_array() else { continue };
        let _ = writeln!(
            s,
            "## Idle connections at scale: {title}\n\n{} client processes from their own 127.0.0.x addresses; \
             open-files limit {} per process.\n\n| open | resident memory | per connection |\n|---|---|---|",
            r[key]["clients"], r[key]["open_files_limit"]
        );
        for p in points {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                num(p["open"].as_f64().unwrap_or(0.0)),
                format_value(p["rss_kib"].as_f64().unwrap_or(0.0) * 1024.0 / 1e6, "MB"),
                format_value(p["bytes_per_connection"].as_f64().unwrap_or(0.0), "B")
            );
        }
        let _ = writeln!(
            s,
            "\nAfter every client left: {} (started at {}).\n",
            format_value(r[key]["rss_after_close_kib"].as_f64().unwrap_or(0.0) * 1024.0 / 1e6, "MB"),
            format_value(r[key]["rss_base_kib"].as_f64().unwrap_or(0.0) * 1024.0 / 1e6, "MB")
        );
    }
    s
}

/// The plots, by file name: Echo latency percentiles per contender (bars),
/// memory per idle WebSocket against the number of connections (lines), and
/// when the run measured them the fan-out ceiling (delivery p99 against
/// deliveries per second) and memory per connection at scale.
pub fn plots(doc: &Value) -> Vec<(&'static str, String)> {
    let percentiles = [("p50", "p50_us"), ("p90", "p90_us"), ("p99", "p99_us"), ("p99.9", "p999_us")];
    let groups: Vec<&str> = percentiles.iter().map(|p| p.0).collect();
    let bars: Vec<(&str, Vec<Option<f64>>)> = CONTENDERS
        .iter()
        .map(|c| {
            let lat = &doc["results"]["echo_latency"][*c]["latency"];
            (*c, percentiles.iter().map(|(_, k)| lat[*k].as_f64()).collect())
        })
        .collect();
    let latency =
        crate::svg::bar_chart("Echo round trip at 2,000 msg/s (lower is better)", "microseconds", &groups, &bars);
    let lines: Vec<(&str, Vec<(f64, f64)>)> = CONTENDERS
        .iter()
        .map(|c| {
            let points = idle_counts(doc)
                .into_iter()
                .filter_map(|n| {
                    let b = doc["results"][format!("idle_{n}")][*c]["processes"][0]["bytes_per_connection"].as_f64()?;
                    Some((n as f64, b))
                })
                .collect();
            (*c, points)
        })
        .collect();
    let memory = crate::svg::line_chart(
        "Resident memory per idle WebSocket (direct = the node itself)",
        "open connections",
        "bytes per connection",
        &lines,
    );
    let mut out = vec![("latency.svg", latency), ("memory.svg", memory)];
    let r = &doc["results"];
    if let Some(steps) = r["fanout_ceiling"]["steps"].as_array() {
        let point = |st: &Value| Some((st["deliveries_per_sec"].as_f64()?, st["latency"]["p99_us"].as_f64()? / 1000.0));
        let line = vec![("delivery p99", steps.iter().filter_map(point).collect())];
        let chart = crate::svg::line_chart(
            "Fan-out through the balancer to 3 nodes: delivery p99 as load grows",
            "deliveries per second",
            "p99 (ms)",
            &line,
        );
        out.push(("ceiling.svg", chart));
    }
    let scale: Vec<(&str, Vec<(f64, f64)>)> = [("node", "connections_node"), ("balancer", "connections_balancer")]
        .iter()
        .filter_map(|(name, key)| {
            let points = r[*key]["points"].as_array()?;
            let p = |p: &Value| Some((p["open"].as_f64()?, p["bytes_per_connection"].as_f64()?));
            Some((*name, points.iter().filter_map(p).collect()))
        })
        .collect();
    if !scale.is_empty() {
        let chart = crate::svg::line_chart(
            "Resident memory per idle connection at scale",
            "open connections",
            "bytes per connection",
            &scale,
        );
        out.push(("connections.svg", chart));
    }
    out
}

/// A short human summary of one workload result, for the progress output.
pub fn one_line(v: &Value) -> String {
    let mut parts = Vec::new();
    for key in [
        "messages_per_sec",
        "connections_per_sec",
        "requests_per_sec",
        "deliveries_per_sec",
        "success_share",
        "open",
        "failed",
        "median_start_to_routed_ms",
        "median_kill_to_last_failed_client_ms",
    ] {
        if let Some(x) = v.get(key).filter(|x| !x.is_null()) {
            parts.push(format!("{key}={x}"));
        }
    }
    for key in ["latency", "setup_latency"] {
        if let (Some(p50), Some(p99)) = (v[key]["p50_us"].as_u64(), v[key]["p99_us"].as_u64()) {
            parts.push(format!("{key} p50={p50}µs p99={p99}µs"));
        }
    }
    if let Some(b) = v["processes"][0]["bytes_per_connection"].as_f64() {
        parts.push(format!("{b:.0} B/conn"));
    }
    if let (Some(all), Some(user)) = (v["cpu"]["us_per_op"].as_f64(), v["cpu"]["user_us_per_op"].as_f64()) {
        parts.push(format!("cpu={all}µs/op (user {user})"));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({
            "mode": "quick",
            "settings": { "idle_counts": [1000] },
            "results": {
                "echo_latency": {
                    "direct": { "latency": { "p50_us": 100, "p90_us": 120, "p99_us": 200, "p999_us": 300 } },
                    "traefik": { "latency": { "p50_us": 400, "p90_us": 500, "p99_us": 800, "p999_us": 900 } },
                    "switchboard": { "latency": { "p50_us": 200, "p90_us": 250, "p99_us": 400, "p999_us": 500 } },
                    "nginx": { "error": "boom" }
                },
                "idle_1000": { "switchboard": { "processes": [ { "bytes_per_connection": 4500.0 } ] } },
                "failover": {
                    "switchboard": { "median_start_to_routed_ms": 9.0, "median_kill_to_last_failed_client_ms": 0.0,
                                     "failed_clients_after_kill": [0], "clients_after_kill": 500 },
                    "traefik": { "median_start_to_routed_ms": 90.0, "median_kill_to_last_failed_client_ms": 1200.0,
                                 "failed_clients_after_kill": [30], "clients_after_kill": 400 }
                }
            }
        })
    }

    #[test]
    fn values_and_ratios_come_from_the_right_places() {
        let d = doc();
        let ms = metrics(&d);
        let p50 = &ms[0];
        assert_eq!(value(&d, p50, "switchboard"), Some(200.0));
        assert_eq!(value(&d, p50, "nginx"), None);
        assert_eq!(ratio(value(&d, p50, "switchboard"), value(&d, p50, "direct")), Some(2.0));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert!(ms.iter().any(|m| m.workload == "idle_1000"));
    }

    #[test]
    fn tables_show_values_ratios_and_failures() {
        let t = headline_table(&doc());
        let row = t.lines().find(|l| l.starts_with("| Echo round trip p50")).expect("p50 row");
        assert!(row.contains("200 µs<br>2.00× direct, 0.50× Traefik"), "{row}");
        assert!(row.contains("| failed |"), "{row}");
        let f = failover_table(&doc());
        assert!(f.contains("| 9.0 ms | 90.0 ms | 0.10× |"), "{f}");
        assert!(f.contains("0 of 500 | 30 of 400"), "{f}");
        assert!(markdown(&doc()).contains("echo_latency / nginx: boom"));
    }

    #[test]
    fn cpu_rows_appear_only_in_runs_that_measured_cpu() {
        let mut d = doc();
        assert!(!metrics(&d).iter().any(|m| m.label.starts_with("CPU")));
        d["results"]["http_health"] = json!({
            "haproxy": { "requests": 100, "cpu": { "us_per_op": 30.0, "user_us_per_op": 10.0 } },
            "switchboard": { "requests": 100, "cpu": { "us_per_op": 60.0, "user_us_per_op": 36.0 } },
        });
        let t = headline_table(&d);
        let row = t.lines().find(|l| l.starts_with("| CPU per GET /health, user part")).expect("user row");
        assert!(row.contains("36 µs"), "{row}");
        assert!(row.contains("10 µs"), "{row}");
        assert!(!t.contains("CPU per connection setup"), "{t}");
        assert!(one_line(&d["results"]["http_health"]["switchboard"]).contains("cpu=60µs/op (user 36)"));
    }

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(format_value(1234567.4, "msg/s"), "1,234,567 msg/s");
        assert_eq!(format_value(999.0, "B"), "999 B");
        assert_eq!(format_value(0.333, "share"), "33 %");
        assert_eq!(format_ratio(Some(0.456)), "0.46×");
        assert_eq!(format_ratio(Some(12.3)), "12×");
        assert_eq!(format_ratio(None), "–");
    }
}
