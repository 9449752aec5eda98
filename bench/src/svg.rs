//! Two small SVG charts for the report: grouped bars (latency percentiles per
//! contender) and lines (memory per connection against connection count).
//! Hand-written because plotters' text layout needs a system font backend
//! (font-kit/fontconfig); SVG text needs none, and the output is plain,
//! diffable and readable by any browser.

use std::fmt::Write;

const W: f64 = 760.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
pub const COLOURS: [&str; 8] = ["#6e7781", "#0969da", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a3069"];

/// Escapes text for SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A "nice" axis maximum and step (1, 2 or 5 × 10^k) covering `max` in about
/// five steps.
pub fn nice_axis(max: f64) -> (f64, f64) {
    if max.is_nan() || max <= 0.0 {
        return (1.0, 0.2);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn frame(title: &str, y_label: &str, y_max: f64, step: f64) -> String {
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" \
         font-family=\"system-ui, sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n\
         <text x=\"{}\" y=\"22\" font-size=\"15\" font-weight=\"600\">{}</text>\n",
        LEFT,
        esc(title)
    );
    let plot_h = H - TOP - BOTTOM;
    let mut v = 0.0;
    while v <= y_max + step / 2.0 {
        let y = TOP + plot_h * (1.0 - v / y_max);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#d0d7de\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            trim_number(v)
        );
        v += step;
    }
    let _ = writeln!(
        s,
        "<text transform=\"translate(16 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        TOP + plot_h / 2.0,
        esc(y_label)
    );
    s
}

fn trim_number(v: f64) -> String {
    if v >= 1000.0 && (v / 1000.0).fract() == 0.0 {
        format!("{}k", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn legend(s: &mut String, names: &[&str]) {
    for (i, name) in names.iter().enumerate() {
        let y = TOP + 10.0 + i as f64 * 20.0;
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{:.1}\">{}</text>",
            W - RIGHT + 16.0,
            y - 10.0,
            COLOURS[i % COLOURS.len()],
            W - RIGHT + 34.0,
            y,
            esc(name)
        );
    }
}

/// Grouped bars: for each group (x label), one bar per series. Missing
/// values (`None`) leave a gap.
pub fn bar_chart(title: &str, y_label: &str, groups: &[&str], series: &[(&str, Vec<Option<f64>>)]) -> String {
    let max = series.iter().flat_map(|(_, v)| v.iter().flatten()).fold(0.0f64, |a, &b| a.max(b));
    let (y_max, step) = nice_axis(max);
    let mut s = frame(title, y_label, y_max, step);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let group_w = plot_w / groups.len().max(1) as f64;
    let bar_w = group_w * 0.8 / series.len().max(1) as f64;
    for (g, label) in groups.iter().enumerate() {
        let gx = LEFT + g as f64 * group_w + group_w * 0.1;
        for (i, (_, values)) in series.iter().enumerate() {
            if let Some(Some(v)) = values.get(g) {
                let h = plot_h * v / y_max;
                let _ = writeln!(
                    s,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{}: {v}</title></rect>",
                    gx + i as f64 * bar_w,
                    TOP + plot_h - h,
                    bar_w * 0.92,
                    COLOURS[i % COLOURS.len()],
                    esc(series[i].0)
                );
            }
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            gx + group_w * 0.4,
            H - BOTTOM + 18.0,
            esc(label)
        );
    }
    let names: Vec<&str> = series.iter().map(|(n, _)| *n).collect();
    legend(&mut s, &names);
    s.push_str("</svg>\n");
    s
}

/// Lines with markers: each series is (x, y) points; x is linear from 0.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[(&str, Vec<(f64, f64)>)]) -> String {
    let y_max_raw = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)).fold(0.0f64, f64::max);
    let x_max_raw = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)).fold(0.0f64, f64::max);
    let (y_max, step) = nice_axis(y_max_raw);
    let (x_max, x_step) = nice_axis(x_max_raw);
    let mut s = frame(title, y_label, y_max, step);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let px = |x: f64| LEFT + plot_w * x / x_max;
    let py = |y: f64| TOP + plot_h * (1.0 - y / y_max);
    let mut x = 0.0;
    while x <= x_max + x_step / 2.0 {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            px(x),
            H - BOTTOM + 18.0,
            trim_number(x)
        );
        x += x_step;
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        LEFT + plot_w / 2.0,
        H - 8.0,
        esc(x_label)
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        if path.len() > 1 {
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
                path.join(" ")
            );
        }
        for &(x, y) in points {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{colour}\"><title>{}: {y:.0} at {x:.0}</title></circle>",
                px(x),
                py(y),
                esc(name)
            );
        }
    }
    let names: Vec<&str> = series.iter().map(|(n, _)| *n).collect();
    legend(&mut s, &names);
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_nice() {
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
        assert_eq!(nice_axis(430.0), (500.0, 100.0));
        assert_eq!(nice_axis(9.0), (10.0, 2.0));
        assert_eq!(nice_axis(12_345.0), (15_000.0, 5_000.0));
    }

    #[test]
    fn bars_scale_to_the_axis_and_escape_text() {
        let svg = bar_chart(
            "p<50>",
            "µs",
            &["p50", "p99"],
            &[("a&b", vec![Some(100.0), None]), ("c", vec![Some(50.0), Some(25.0)])],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("p&lt;50&gt;") && svg.contains("a&amp;b"));
        // Three bars: the missing value leaves a gap.
        assert_eq!(svg.matches("<rect x=").count() - 2, 3, "{svg}"); // minus two legend swatches
                                                                     // The tallest bar (100 of an axis to 100) fills the plot height.
        assert!(svg.contains(&format!("height=\"{:.1}\"", H - TOP - BOTTOM)));
    }

    #[test]
    fn lines_have_one_marker_per_point() {
        let svg = line_chart(
            "m",
            "connections",
            "B",
            &[("x", vec![(1000.0, 4000.0), (5000.0, 4200.0)]), ("y", vec![(1000.0, 9000.0)])],
        );
        assert_eq!(svg.matches("<circle").count(), 3);
        assert_eq!(svg.matches("<polyline").count(), 1);
    }
}
