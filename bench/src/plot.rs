//! Latency percentile-spectrum plots (SVG), like HdrHistogram's plotter: the x axis
//! is the percentile on a log scale of 1/(1-p), so 90 %, 99 %, 99.9 %, 99.99 % are
//! evenly spaced; the y axis is the latency. One curve per run, with a legend.
//!
//! Curves are drawn 2 px wide and everything else (axes, ticks, grid) 1 px, so a
//! reader of the SVG can tell the data series apart: one `<polyline>` with
//! `stroke-width="2"` per run.
//!
//! The x coordinate drawn is log10(1/(1-p)) on a linear axis, which is the same
//! picture with tick labels exactly at the decades ("90%", "99%", …).

use std::path::Path;

use plotters::prelude::*;

/// One curve: a legend label and (1/(1-p), latency µs) points.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// `90%`, `99%`, `99.9%` … for the decade `k` (x = 10^k).
pub fn percentile_label(k: f64) -> String {
    let r = k.round();
    if (k - r).abs() > 1e-6 || r < 0.0 {
        return String::new();
    }
    if r == 0.0 {
        return "0%".into();
    }
    let pct = 100.0 * (1.0 - 10f64.powf(-r));
    let decimals = (r as usize).saturating_sub(2);
    format!("{pct:.decimals$}%")
}

/// Draws `curves` into an SVG file.
pub fn draw(path: &Path, title: &str, curves: &[Curve]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let xmax = curves
        .iter()
        .flat_map(|c| c.points.iter())
        .map(|(x, _)| x.log10())
        .fold(2.0f64, f64::max);
    // 1/(1-0.99999) is 100000.0000008 in floating point: do not open a decade for that.
    let xmax = (xmax - 1e-6).ceil();
    let ymax = curves
        .iter()
        .flat_map(|c| c.points.iter())
        .map(|(_, y)| *y)
        .fold(0.0f64, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.05 } else { 1.0 };

    let root = SVGBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|e| err(&e))?;
    let fmt_x = |x: &f64| percentile_label(*x);
    let y_decimals = if ymax >= 100.0 {
        0
    } else if ymax >= 10.0 {
        1
    } else {
        2
    };
    let fmt_y = move |y: &f64| format!("{y:.y_decimals$}");
    chart
        .configure_mesh()
        .x_desc("Percentile")
        .y_desc("Latency (µs)")
        .x_labels(xmax as usize + 1)
        .x_label_formatter(&fmt_x)
        .y_labels(10)
        .y_label_formatter(&fmt_y)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, c) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts = c.points.iter().map(|(x, y)| (x.log10(), *y));
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(c.label.clone())
            // A filled box, not a line sample: the file then has exactly one
            // polyline per curve, which is what readers (and the tests) count.
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_at_the_decades_only() {
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        assert_eq!(percentile_label(4.0), "99.99%");
        assert_eq!(percentile_label(5.0), "99.999%");
        assert_eq!(percentile_label(1.5), "");
    }
}
