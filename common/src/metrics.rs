//! Prometheus helpers both programs use: each creates and registers one
//! metric in a `Registry` (names and labels are static and distinct, so
//! creation and registration cannot fail), and `render` writes the text
//! exposition format.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    let _ = r.register(Box::new(m.clone()));
    m
}

pub fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help).unwrap_or_else(|_| unreachable!("static metric name {name}")))
}

pub fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels);
    register(r, m.unwrap_or_else(|_| unreachable!("static metric name {name}")))
}

pub fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help).unwrap_or_else(|_| unreachable!("static metric name {name}")))
}

pub fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels);
    register(r, m.unwrap_or_else(|_| unreachable!("static metric name {name}")))
}

pub fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let m = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets));
    register(r, m.unwrap_or_else(|_| unreachable!("static metric name {name}")))
}

/// The registry in Prometheus's text format.
pub fn render(r: &Registry) -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&r.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_metrics_are_rendered() {
        let r = Registry::new();
        counter(&r, "x_total", "x").inc();
        gauge_vec(&r, "y", "y", &["k"]).with_label_values(&["v"]).set(3);
        histogram(&r, "z_seconds", "z", vec![0.1, 1.0]).observe(0.5);
        let text = render(&r);
        assert!(
            text.contains("x_total 1") && text.contains("y{k=\"v\"} 3") && text.contains("z_seconds_count 1"),
            "{text}"
        );
    }
}
