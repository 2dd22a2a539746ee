//! PNG figures: training curves, effective rank, singular spectra, the mask-ratio study, t-SNE
//! scatter plots and reconstruction grids.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

/// The ten colours of matplotlib's tab10 palette.
pub const TAB10: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Register a TrueType font for labels (once): `UMAE_FONT`, else a system DejaVu/Liberation.
pub fn ensure_font() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let candidates: Vec<String> = std::env::var("UMAE_FONT")
            .ok()
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()))
            .collect();
        for path in &candidates {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{path} is not a usable TrueType font"));
            }
        }
        Err(format!(
            "no TrueType font for figure labels: install one (`apt-get install -y fonts-dejavu-core`) or set UMAE_FONT=/path/to/font.ttf (looked in {})",
            candidates.join(", ")
        ))
    })
    .clone()
}

fn err<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> String + '_ {
    move |e| format!("cannot draw {}: {e:?}", path.display())
}

/// A labelled 2-D point: (x, y, class).
pub type LabelledPoint = (f32, f32, usize);

/// An image for [`image_grid`]: (channels, height, width, values).
pub type GridImage = (usize, usize, usize, Vec<f32>);

/// A named curve.
pub type Series = (String, Vec<(f64, f64)>);

fn bounds(series: &[Series], log_y: bool) -> Option<(f64, f64, f64, f64)> {
    let pts = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    let mut any = false;
    for &(x, y) in pts {
        any = true;
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !any {
        return None;
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if log_y {
        return Some((x0, x1, y0 * 0.8, y1 * 1.25));
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    Some((x0, x1, y0 - pad, y1 + pad))
}

/// The legend of a chart's labelled series, on a translucent white box.
fn legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
    font: u32,
) -> Result<(), String>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: plotters::coord::CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", font))
        .draw()
        .map_err(|e| format!("{e:?}"))
}

fn draw_lines<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
    markers: bool,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| format!("{e:?}");
    let Some((x0, x1, y0, y1)) = bounds(series, log_y) else {
        area.titled(&format!("{title} (no data)"), ("sans-serif", 20))
            .map_err(e)?;
        return Ok(());
    };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(e)?;
            for (i, (name, pts)) in series.iter().enumerate() {
                let c = TAB10[i % 10];
                let pts: Vec<(f64, f64)> = pts
                    .iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0))
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                    .map_err(e)?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                    });
                if markers {
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                        .map_err(e)?;
                }
            }
            if series.len() > 1 || !series.first().is_some_and(|s| s.0.is_empty()) {
                legend(&mut chart, SeriesLabelPosition::MiddleRight, 14)?;
            }
        }};
    }
    if log_y {
        body!(builder
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .map_err(e)?);
    } else {
        body!(builder.build_cartesian_2d(x0..x1, y0..y1).map_err(e)?);
    }
    Ok(())
}

/// One line chart with a legend.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<(), String> {
    ensure_font()?;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    draw_lines(
        &root,
        title,
        x_label,
        y_label,
        series,
        log_y,
        series.iter().all(|s| s.1.len() <= 60),
    )?;
    root.present().map_err(err(path))
}

/// Several line charts side by side.
pub fn panels(path: &Path, charts: &[(&str, &str, &str, Vec<Series>, bool)]) -> Result<(), String> {
    ensure_font()?;
    let w = 620 * charts.len() as u32;
    let root = BitMapBackend::new(path, (w, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let areas = root.split_evenly((1, charts.len()));
    for (area, (title, xl, yl, series, log_y)) in areas.iter().zip(charts) {
        draw_lines(area, title, xl, yl, series, *log_y, true)?;
    }
    root.present().map_err(err(path))
}

/// A named series of (x index, mean, standard deviation) points for [`error_bar_panels`].
pub type ErrorSeries = (String, Vec<(usize, f64, Option<f64>)>);

/// Panels of means with one-standard-deviation error bars against categorical x values
/// (`ticks`, equally spaced in their order), one panel per (title, y label, series).
pub fn error_bar_panels(
    path: &Path,
    x_label: &str,
    ticks: &[String],
    charts: &[(String, String, Vec<ErrorSeries>)],
) -> Result<(), String> {
    ensure_font()?;
    let w = 560 * charts.len().max(1) as u32;
    let root = BitMapBackend::new(path, (w, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let areas = root.split_evenly((1, charts.len().max(1)));
    let e = |e: DrawingAreaErrorKind<_>| format!("cannot draw {}: {e:?}", path.display());
    for (area, (title, y_label, series)) in areas.iter().zip(charts) {
        let (mut y0, mut y1) = (f64::MAX, f64::MIN);
        for (_, pts) in series {
            for &(_, m, sd) in pts {
                let sd = sd.unwrap_or(0.0);
                if m.is_finite() && sd.is_finite() {
                    y0 = y0.min(m - sd);
                    y1 = y1.max(m + sd);
                }
            }
        }
        if y0 > y1 {
            area.titled(&format!("{title} (no data)"), ("sans-serif", 20))
                .map_err(e)?;
            continue;
        }
        let pad = ((y1 - y0) * 0.08).max(1e-6 * y1.abs().max(1.0));
        let n = ticks.len().max(1);
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..n as f64 - 0.5, y0 - pad..y1 + pad)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label.as_str())
            .x_labels(n + 1)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < ticks.len() {
                    ticks[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(e)?;
        for (k, (name, pts)) in series.iter().enumerate() {
            let c = TAB10[k % 10];
            // Lines side by side a little, so that error bars do not hide each other.
            let shift = (k as f64 - (series.len() as f64 - 1.0) / 2.0) * 0.06;
            let pts: Vec<(f64, f64, f64)> = pts
                .iter()
                .filter(|p| p.1.is_finite())
                .map(|&(x, m, sd)| (x as f64 + shift, m, sd.unwrap_or(0.0)))
                .collect();
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|&(x, m, _)| (x, m)),
                    c.stroke_width(2),
                ))
                .map_err(e)?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            chart
                .draw_series(
                    pts.iter().map(|&(x, m, sd)| {
                        ErrorBar::new_vertical(x, m - sd, m, m + sd, c.filled(), 8)
                    }),
                )
                .map_err(e)?;
        }
        if series.len() > 1 || series.first().is_some_and(|s| !s.0.is_empty()) {
            legend(&mut chart, SeriesLabelPosition::MiddleRight, 14)?;
        }
    }
    root.present().map_err(err(path))
}

/// Scatter plots of labelled 2-D points, one panel per entry, coloured by class.
pub fn scatter_panels(
    path: &Path,
    panels: &[(String, Vec<LabelledPoint>)],
    class_names: &[String],
) -> Result<(), String> {
    ensure_font()?;
    let w = 620 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (w, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (area, (title, pts)) in areas.iter().zip(panels) {
        let e = |e: DrawingAreaErrorKind<_>| format!("cannot draw {}: {e:?}", path.display());
        let (mut x0, mut x1, mut y0, mut y1) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
        for &(x, y, _) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if pts.is_empty() || x1 <= x0 || y1 <= y0 {
            continue;
        }
        let (px, py) = ((x1 - x0) * 0.05, (y1 - y0) * 0.05);
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .build_cartesian_2d(x0 - px..x1 + px, y0 - py..y1 + py)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .disable_axes()
            .draw()
            .map_err(e)?;
        let classes = pts.iter().map(|p| p.2).max().unwrap_or(0) + 1;
        for c in 0..classes {
            let color = TAB10[c % 10];
            let name = class_names
                .get(c)
                .cloned()
                .unwrap_or_else(|| format!("class {c}"));
            chart
                .draw_series(
                    pts.iter()
                        .filter(|p| p.2 == c)
                        .map(|&(x, y, _)| Circle::new((x, y), 2, color.filled())),
                )
                .map_err(e)?
                .label(name)
                .legend(move |(x, y)| Circle::new((x + 6, y), 4, color.filled()));
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight, 12)?;
    }
    root.present().map_err(err(path))
}

/// A grid of images (`[C, H, W]` values in [0, 1]; C = 1 or 3), `scale` x nearest-neighbour,
/// with a 2-pixel white gutter, written as PNG.
pub fn image_grid(path: &Path, rows: &[Vec<GridImage>], scale: usize) -> Result<(), String> {
    let cell_h = rows
        .iter()
        .flat_map(|r| r.iter().map(|i| i.1))
        .max()
        .unwrap_or(0)
        * scale;
    let cell_w = rows
        .iter()
        .flat_map(|r| r.iter().map(|i| i.2))
        .max()
        .unwrap_or(0)
        * scale;
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let gut = 2;
    let (w, h) = (
        cols * (cell_w + gut) + gut,
        rows.len() * (cell_h + gut) + gut,
    );
    if w <= gut || h <= gut {
        return Err("no images to draw".into());
    }
    let mut img = image::RgbImage::from_pixel(w as u32, h as u32, image::Rgb([255, 255, 255]));
    for (r, row) in rows.iter().enumerate() {
        for (c, (ch, ih, iw, data)) in row.iter().enumerate() {
            for y in 0..ih * scale {
                for x in 0..iw * scale {
                    let (sy, sx) = (y / scale, x / scale);
                    let v = |k: usize| {
                        let k = if *ch == 3 { k } else { 0 };
                        (data[k * ih * iw + sy * iw + sx].clamp(0.0, 1.0) * 255.0).round() as u8
                    };
                    img.put_pixel(
                        (gut + c * (cell_w + gut) + x) as u32,
                        (gut + r * (cell_h + gut) + y) as u32,
                        image::Rgb([v(0), v(1), v(2)]),
                    );
                }
            }
        }
    }
    img.save(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
