//! Figures of the report, as PNG: line plots (plotters, with an embedded DejaVu Sans so
//! text renders the same on every machine) and segmentation overlays (image).

use std::path::Path;

use image::{Rgb, RgbImage};
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One line of a plot.
pub struct Series<'a> {
    pub name: &'a str,
    pub values: &'a [f64],
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// A line plot of per-epoch values, epochs from 1.
pub fn line_plot(path: &Path, title: &str, y_label: &str, series: &[Series]) -> Result<(), String> {
    register_font();
    let err = |e: &dyn std::fmt::Display| format!("cannot draw `{}`: {e}", path.display());
    let epochs = series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.values.iter().copied())
            .filter(|v| v.is_finite())
    };
    let (mut lo, mut hi) = (
        finite().fold(f64::INFINITY, f64::min),
        finite().fold(f64::NEG_INFINITY, f64::max),
    );
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(1e-3);
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(1f64..epochs as f64, (lo - pad)..(hi + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .x_labels(epochs.min(16))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let points: Vec<(f64, f64)> = s
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(e, v)| ((e + 1) as f64, *v))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

const KIDNEY: [u8; 3] = [230, 60, 60];
const TUMOR: [u8; 3] = [250, 210, 40];

/// Rows of (CT | truth | prediction), labels overlaid in colour (kidney red, tumor
/// yellow); each cell scaled up to about 192 pixels.
pub fn overlays(
    path: &Path,
    size: usize,
    images: &[&[f32]],
    truths: &[&[u8]],
    preds: &[&[u8]],
) -> Result<(), String> {
    let scale = (192 / size).max(1);
    let cell = size * scale;
    let gap = 6;
    let rows = images.len().max(1);
    let (w, h) = (3 * cell + 4 * gap, rows * cell + (rows + 1) * gap);
    let mut img = RgbImage::from_pixel(w as u32, h as u32, Rgb([255, 255, 255]));
    for (r, ((ct, truth), pred)) in images.iter().zip(truths).zip(preds).enumerate() {
        let (lo, hi) = ct
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let gray = |v: f32| {
            if hi > lo {
                ((v - lo) / (hi - lo) * 255.0).round() as u8
            } else {
                0
            }
        };
        for (c, labels) in [None, Some(truth), Some(pred)].into_iter().enumerate() {
            let (x0, y0) = (gap + c * (cell + gap), gap + r * (cell + gap));
            for y in 0..cell {
                for x in 0..cell {
                    let i = (y / scale) * size + x / scale;
                    let g = gray(ct[i]);
                    let mut px = [g, g, g];
                    if let Some(l) = labels {
                        let colour = match l[i] {
                            1 => Some(KIDNEY),
                            2 => Some(TUMOR),
                            _ => None,
                        };
                        if let Some(col) = colour {
                            for k in 0..3 {
                                px[k] = ((u16::from(px[k]) * 2 + u16::from(col[k]) * 3) / 5) as u8;
                            }
                        }
                    }
                    img.put_pixel((x0 + x) as u32, (y0 + y) as u32, Rgb(px));
                }
            }
        }
    }
    img.save(path)
        .map_err(|e| format!("cannot write `{}`: {e}", path.display()))
}
