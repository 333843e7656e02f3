//! ringblk-bench as a library: the latency report writers shared by the
//! `ringblk-bench` binary and `ringblk-ctl stats --hgrm/--svg` (one `.hgrm` writer
//! and one plotter, so a server-side and a client-side report are the same format).

pub mod hgrm;
pub mod plot;

use hdrhistogram::Histogram;

/// A histogram in ns as a plot curve in µs (through the `.hgrm` text, so a plot drawn
/// from a histogram and `ringblk-bench plot` of its `.hgrm` file are the same picture).
pub fn curve_of(hist: &Histogram<u64>, label: String) -> plot::Curve {
    let mut text = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = hgrm::write(hist, 1000.0, &mut text);
    let parsed = hgrm::parse(&String::from_utf8_lossy(&text)).unwrap_or_default();
    plot::Curve {
        label,
        points: parsed.spectrum(),
    }
}
