//! `--plot FILE.png|FILE.svg`: utilization and hit ratio over time, one line
//! per run. PNG text is drawn with an embedded font (DejaVu Sans), so no
//! system font is needed.

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result, bail};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::sim::RunResult;

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded DejaVu Sans is a valid TrueType font; registration
        // cannot fail for it, and a failure would only lose the labels.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    runs: &[RunResult],
    x_label: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let (top, bottom) = root.split_vertically(root.dim_in_pixel().1 / 2);
    let x_max = runs
        .iter()
        .flat_map(|r| r.samples.iter().map(|s| s.x))
        .fold(1.0f64, f64::max);
    for (area, title, pick) in [
        (&top, "device utilization", 0usize),
        (&bottom, "cumulative block hit ratio", 1usize),
    ] {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..x_max, 0f64..1.0f64)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for (k, run) in runs.iter().enumerate() {
            // The offline reference has a hit ratio, not a utilization.
            if pick == 0 && run.policy == "belady" {
                continue;
            }
            let color = COLORS[k % COLORS.len()];
            let name = format!("{} / {}", run.policy, run.preempt);
            chart
                .draw_series(LineSeries::new(
                    run.samples.iter().map(|s| {
                        (
                            s.x,
                            if pick == 0 {
                                s.utilization
                            } else {
                                s.hit_ratio
                            },
                        )
                    }),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

/// Writes the plot; the format follows the extension.
pub fn write(path: &Path, runs: &[RunResult], x_label: &str) -> Result<()> {
    if runs.iter().all(|r| r.samples.is_empty()) {
        bail!("nothing to plot");
    }
    register_font();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => {
            let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
            draw(&root, runs, x_label)
        }
        Some("svg") => {
            let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
            draw(&root, runs, x_label)
        }
        _ => bail!(
            "--plot needs a .png or .svg file name, got {}",
            path.display()
        ),
    }
    .with_context(|| format!("writing {}", path.display()))
}
