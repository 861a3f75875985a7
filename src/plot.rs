//! Pictures: eigenvalue spectra of a state ([`spectrum`]), curves ([`curves`]) and
//! grids of images ([`image_grid`]), as PNG (default) or SVG ([`Format::of`] a file
//! name). Shapes are drawn by plotters' bitmap and SVG backends; text in PNGs is
//! rasterised with ab_glyph from the bundled DejaVu Sans Mono (`assets/fonts/`), so no
//! system font library is needed; SVGs carry their text as `<text>`.

use std::path::Path;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters_backend::DrawingErrorKind;

use crate::curvature::layout::BlockKind;
use crate::curvature::state::CurvatureState;
use crate::error::{Error, Result};

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");

/// Colours of the series, in order.
pub const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];
const GREY: RGBColor = RGBColor(200, 200, 200);

/// The file format of a picture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Png,
    Svg,
}

impl Format {
    /// SVG when the file name ends in `.svg` (any case), PNG otherwise.
    pub fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("svg") => Format::Svg,
            _ => Format::Png,
        }
    }
}

/// One thing drawn, in pixel coordinates (origin top left).
enum Item {
    Line {
        points: Vec<(i32, i32)>,
        color: RGBColor,
        width: u32,
    },
    Rect {
        corners: [(i32, i32); 2],
        color: RGBColor,
        filled: bool,
    },
    Text {
        at: (i32, i32),
        size: f32,
        text: String,
        color: RGBColor,
        /// -1 left, 0 centre, 1 right.
        align: i8,
    },
}

/// A picture of `width × height` pixels on white.
pub struct Picture {
    pub width: u32,
    pub height: u32,
    items: Vec<Item>,
}

impl Picture {
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            items: Vec::new(),
        }
    }

    fn line(&mut self, points: Vec<(i32, i32)>, color: RGBColor, width: u32) {
        self.items.push(Item::Line {
            points,
            color,
            width,
        });
    }

    fn rect(&mut self, corners: [(i32, i32); 2], color: RGBColor, filled: bool) {
        self.items.push(Item::Rect {
            corners,
            color,
            filled,
        });
    }

    fn text(&mut self, at: (i32, i32), size: f32, text: impl Into<String>, align: i8) {
        self.items.push(Item::Text {
            at,
            size,
            text: text.into(),
            color: BLACK,
            align,
        });
    }

    /// The picture's file bytes in `format`; `path` names the output in errors.
    pub fn encode(&self, format: Format, path: &Path) -> Result<Vec<u8>> {
        let err = |e: String| Error::input(path.display(), format!("drawing: {e}"));
        match format {
            Format::Png => {
                let (w, h) = (self.width as usize, self.height as usize);
                let mut rgb = vec![255u8; w * h * 3];
                {
                    let mut backend =
                        BitMapBackend::with_buffer(&mut rgb, (self.width, self.height));
                    self.shapes(&mut backend).map_err(|e| err(e.to_string()))?;
                    backend.present().map_err(|e| err(e.to_string()))?;
                }
                for item in &self.items {
                    if let Item::Text {
                        at,
                        size,
                        text,
                        color,
                        align,
                    } = item
                    {
                        raster_text(&mut rgb, (w, h), *at, *size, text, *color, *align);
                    }
                }
                let mut out = Vec::new();
                let mut encoder = png::Encoder::new(&mut out, self.width, self.height);
                encoder.set_color(png::ColorType::Rgb);
                encoder.set_depth(png::BitDepth::Eight);
                encoder
                    .write_header()
                    .and_then(|mut wr| wr.write_image_data(&rgb))
                    .map_err(|e| err(e.to_string()))?;
                Ok(out)
            }
            Format::Svg => {
                let mut svg = String::new();
                {
                    let mut backend = SVGBackend::with_string(&mut svg, (self.width, self.height));
                    backend
                        .draw_rect(
                            (0, 0),
                            (self.width as i32, self.height as i32),
                            &WHITE,
                            true,
                        )
                        .map_err(|e| err(e.to_string()))?;
                    self.shapes(&mut backend).map_err(|e| err(e.to_string()))?;
                    for item in &self.items {
                        if let Item::Text {
                            at,
                            size,
                            text,
                            color,
                            align,
                        } = item
                        {
                            let h = match align {
                                -1 => HPos::Left,
                                0 => HPos::Center,
                                _ => HPos::Right,
                            };
                            let style = TextStyle::from((FontFamily::Monospace, *size as f64))
                                .color(color)
                                .pos(Pos::new(h, VPos::Center));
                            backend
                                .draw_text(text, &style, *at)
                                .map_err(|e| err(e.to_string()))?;
                        }
                    }
                    backend.present().map_err(|e| err(e.to_string()))?;
                }
                Ok(svg.into_bytes())
            }
        }
    }

    /// Draws every line and rectangle on `backend`.
    fn shapes<B: DrawingBackend>(
        &self,
        backend: &mut B,
    ) -> std::result::Result<(), DrawingErrorKind<B::ErrorType>> {
        for item in &self.items {
            match item {
                Item::Line {
                    points,
                    color,
                    width,
                } => backend.draw_path(points.iter().copied(), &color.stroke_width(*width))?,
                Item::Rect {
                    corners,
                    color,
                    filled,
                } => backend.draw_rect(corners[0], corners[1], color, *filled)?,
                Item::Text { .. } => {}
            }
        }
        Ok(())
    }
}

/// Draws `text` into the RGB buffer, vertically centred on `at.1`.
fn raster_text(
    rgb: &mut [u8],
    (w, h): (usize, usize),
    at: (i32, i32),
    size: f32,
    text: &str,
    color: RGBColor,
    align: i8,
) {
    let Ok(font) = FontRef::try_from_slice(FONT) else {
        return;
    };
    let scaled = font.as_scaled(PxScale::from(size));
    let width: f32 = text
        .chars()
        .map(|c| scaled.h_advance(font.glyph_id(c)))
        .sum();
    let mut x = at.0 as f32
        - match align {
            -1 => 0.0,
            0 => width / 2.0,
            _ => width,
        };
    let baseline = at.1 as f32 + (scaled.ascent() + scaled.descent()) / 2.0;
    for c in text.chars() {
        let id = font.glyph_id(c);
        let glyph = id.with_scale_and_position(size, ab_glyph::point(x, baseline));
        x += scaled.h_advance(id);
        let Some(outline) = font.outline_glyph(glyph) else {
            continue;
        };
        let bounds = outline.px_bounds();
        outline.draw(|gx, gy, coverage| {
            let px = bounds.min.x as i32 + gx as i32;
            let py = bounds.min.y as i32 + gy as i32;
            if px < 0 || py < 0 || px as usize >= w || py as usize >= h {
                return;
            }
            let i = (py as usize * w + px as usize) * 3;
            let c = coverage.clamp(0.0, 1.0);
            for (k, v) in [color.0, color.1, color.2].into_iter().enumerate() {
                rgb[i + k] = (f32::from(rgb[i + k]) * (1.0 - c) + f32::from(v) * c) as u8;
            }
        });
    }
}

/// One line of a chart: label, colour, points `(x, y)` (y in data units).
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// A chart panel at `origin` of `size` pixels: frame, title, ticks with labels, the
/// series (y on a log10 scale when `log_y`; non-positive values dropped), horizontal
/// reference lines `(label, y)`, and a legend.
fn panel(
    pic: &mut Picture,
    (origin, size): ((i32, i32), (i32, i32)),
    title: &str,
    series: &[Series],
    hlines: &[(String, f64)],
    log_y: bool,
) {
    let (left, top) = (origin.0 + 70, origin.1 + 30);
    let (right, bottom) = (origin.0 + size.0 - 15, origin.1 + size.1 - 35);
    pic.text(((left + right) / 2, origin.1 + 14), 14.0, title, 0);
    let fy = |y: f64| if log_y { y.log10() } else { y };
    let ys = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(hlines.iter().map(|h| h.1))
        .filter(|&y| !log_y || y > 0.0)
        .map(fy)
        .filter(|y| y.is_finite());
    let (mut y0, mut y1) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    if log_y {
        // Fourteen decades below the largest value at most: f32 noise below that.
        (y0, y1) = (y0.floor().max(y1.ceil() - 14.0), y1.ceil());
    }
    if y1 - y0 < 1e-12 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let y_step = if log_y {
        1.0
    } else {
        let step = nice_step(y1 - y0, 5);
        (y0, y1) = ((y0 / step).floor() * step, (y1 / step).ceil() * step);
        step
    };
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x0, mut x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let x0 = if x0.is_finite() { x0 } else { 0.0 };
    if !x1.is_finite() || x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let x_step = nice_step(x1 - x0, 5);
    let px = |x: f64| left + ((x - x0) / (x1 - x0) * f64::from(right - left)).round() as i32;
    let py = |y: f64| bottom - ((y - y0) / (y1 - y0) * f64::from(bottom - top)).round() as i32;
    // Grid and y ticks: decades on a log scale, five steps otherwise.
    let steps = if log_y {
        let n = (y1 - y0).round() as usize;
        let every = n.div_ceil(8).max(1);
        (0..=n)
            .step_by(every)
            .map(|i| y0 + i as f64)
            .collect::<Vec<_>>()
    } else {
        let n = ((y1 - y0) / y_step).round() as usize;
        (0..=n).map(|i| y0 + y_step * i as f64).collect()
    };
    for y in steps {
        pic.line(vec![(left, py(y)), (right, py(y))], GREY, 1);
        let label = if log_y {
            format!("1e{}", y as i64)
        } else {
            tick_label(y, y_step)
        };
        pic.text((left - 6, py(y)), 12.0, label, 1);
    }
    let mut x = (x0 / x_step).ceil() * x_step;
    while x <= x1 + 1e-9 * x_step {
        pic.text((px(x), bottom + 14), 12.0, tick_label(x, x_step), 0);
        x += x_step;
    }
    pic.rect([(left, top), (right, bottom)], BLACK, false);
    for (label, y) in hlines {
        let y = fy(*y);
        if y.is_finite() {
            // Dashed.
            let mut x = left;
            while x < right {
                pic.line(vec![(x, py(y)), ((x + 8).min(right), py(y))], PALETTE[3], 2);
                x += 14;
            }
            pic.text((right - 4, py(y) - 9), 12.0, label.clone(), 1);
        }
    }
    for s in series {
        let points: Vec<(i32, i32)> = s
            .points
            .iter()
            .filter(|p| !log_y || p.1 > 0.0)
            .map(|&(x, y)| (px(x), py(fy(y).max(y0))))
            .collect();
        pic.line(points, s.color, 2);
    }
    // The legend on a white box in the corner that hides the fewest points.
    let longest = series
        .iter()
        .map(|s| s.label.chars().count())
        .max()
        .unwrap_or(0);
    if longest == 0 {
        return;
    }
    let (w, h) = (38 + 8 * longest as i32, 2 + 16 * series.len() as i32);
    let corners = [
        (left + 2, top + 2),
        (right - 2 - w, top + 2),
        (left + 2, bottom - 2 - h),
        (right - 2 - w, bottom - 2 - h),
    ];
    let hidden = |&(cx, cy): &(i32, i32)| {
        series
            .iter()
            .flat_map(|s| &s.points)
            .filter(|p| !log_y || p.1 > 0.0)
            .map(|&(x, y)| (px(x), py(fy(y).max(y0))))
            .filter(|&(x, y)| (cx..=cx + w).contains(&x) && (cy..=cy + h).contains(&y))
            .count()
    };
    // The first of the least covered corners: top left, top right, bottom left, right.
    let (bx, by) = corners
        .iter()
        .min_by_key(|c| hidden(c))
        .copied()
        .unwrap_or(corners[0]);
    pic.rect([(bx, by), (bx + w, by + h)], WHITE, true);
    pic.rect([(bx, by), (bx + w, by + h)], GREY, false);
    for (i, s) in series.iter().enumerate() {
        let ly = by + 10 + 16 * i as i32;
        pic.line(vec![(bx + 6, ly), (bx + 26, ly)], s.color, 3);
        pic.text((bx + 32, ly), 12.0, s.label.clone(), -1);
    }
}

/// A round tick spacing (1, 2 or 5 times a power of ten) that splits `range` into at
/// most about `ticks` steps.
fn nice_step(range: f64, ticks: u32) -> f64 {
    let raw = (range / f64::from(ticks)).max(f64::MIN_POSITIVE);
    let decade = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * decade)
        .find(|&step| step >= raw)
        .unwrap_or(10.0 * decade)
}

/// `value` with as many decimals as the tick spacing `step` needs.
fn tick_label(value: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let value = if value.abs() < step * 1e-9 {
        0.0
    } else {
        value
    };
    format!("{value:.decimals$}")
}

/// Per layer of `state`, KFAC's eigenvalues (products of the factors' eigenvalues, per
/// block) and EKFAC's corrected eigenvalues, each sorted descending, against their rank
/// on a log scale, with the damping `δ` as a dashed line. One panel per layer, two
/// per row, 480 × 300 pixels each.
pub fn spectrum(state: &CurvatureState, damping: f64) -> Picture {
    let layers = &state.layout.layers;
    let cols = if layers.len() > 1 { 2 } else { 1 };
    let rows = layers.len().div_ceil(cols).max(1);
    let (pw, ph) = (480, 300);
    let mut pic = Picture::new(pw * cols as u32, ph * rows as u32);
    for (i, (layer, factors)) in layers.iter().zip(&state.layers).enumerate() {
        let mut kfac = Vec::new();
        let mut ekfac = Vec::new();
        for &b in &layer.blocks {
            let block = &state.layout.blocks[b];
            let g = &factors.gradient.values;
            match (&factors.input, block.kind) {
                (Some(a), BlockKind::Weight | BlockKind::Joint) => {
                    for &lg in g {
                        kfac.extend(a.values.iter().map(|&la| f64::from(lg) * f64::from(la)));
                    }
                }
                _ => kfac.extend(g.iter().map(|&v| f64::from(v))),
            }
            if let Some(c) = &state.corrected {
                ekfac.extend(c[b].iter().map(|&v| f64::from(v)));
            }
        }
        let sorted = |mut v: Vec<f64>| {
            v.sort_by(|a, b| b.total_cmp(a));
            v.into_iter()
                .enumerate()
                .map(|(r, y)| ((r + 1) as f64, y))
                .collect::<Vec<_>>()
        };
        let mut series = vec![Series {
            label: "KFAC".into(),
            color: PALETTE[0],
            points: sorted(kfac),
        }];
        if !ekfac.is_empty() {
            series.push(Series {
                label: "EKFAC".into(),
                color: PALETTE[1],
                points: sorted(ekfac),
            });
        }
        let origin = ((i % cols) as i32 * pw as i32, (i / cols) as i32 * ph as i32);
        panel(
            &mut pic,
            (origin, (pw as i32, ph as i32)),
            &format!("layer {}: eigenvalues by rank", layer.name),
            &series,
            &[(format!("damping {damping:e}"), damping)],
            true,
        );
    }
    pic
}

/// Line charts side by side, one per `(title, series, log_y)`, 480 × 320 pixels each;
/// x is the step.
pub fn curves(charts: &[(String, Vec<Series>, bool)]) -> Picture {
    let (pw, ph) = (480, 320);
    let mut pic = Picture::new(pw * charts.len().max(1) as u32, ph);
    for (i, (title, series, log_y)) in charts.iter().enumerate() {
        panel(
            &mut pic,
            ((i as i32 * pw as i32, 0), (pw as i32, ph as i32)),
            title,
            series,
            &[],
            *log_y,
        );
    }
    pic
}

/// One image of a grid: `[C, H, W]` values (C = 1 or 3), scaled from its own range to
/// 0..255, and a caption of up to two lines.
pub struct Tile<'a> {
    pub pixels: &'a [f32],
    pub shape: [usize; 3],
    pub caption: [String; 2],
}

/// A row-major grid of `tiles` with `cols` columns, each image scaled up to 96 pixels
/// on its longer side, its caption below.
pub fn image_grid(title: &str, tiles: &[Tile], cols: usize) -> Picture {
    let cols = cols.max(1);
    let rows = tiles.len().div_ceil(cols).max(1);
    let (cell_w, cell_h) = (120i32, 140i32);
    let mut pic = Picture::new(
        cell_w as u32 * cols as u32,
        (cell_h * rows as i32 + 28) as u32,
    );
    pic.text((pic.width as i32 / 2, 12), 13.0, title, 0);
    for (t, tile) in tiles.iter().enumerate() {
        let [c, h, w] = tile.shape;
        let (ox, oy) = ((t % cols) as i32 * cell_w, (t / cols) as i32 * cell_h + 28);
        let scale = (96 / h.max(w).max(1)).max(1) as i32;
        let (lo, hi) = tile
            .pixels
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let span = if hi > lo { hi - lo } else { 1.0 };
        let x0 = ox + (cell_w - w as i32 * scale) / 2;
        for y in 0..h {
            for x in 0..w {
                let v = |ch: usize| {
                    let k = ch.min(c - 1);
                    ((tile.pixels[(k * h + y) * w + x] - lo) / span * 255.0) as u8
                };
                let color = RGBColor(v(0), v(1), v(2));
                let (px, py) = (x0 + x as i32 * scale, oy + y as i32 * scale);
                pic.rect([(px, py), (px + scale, py + scale)], color, true);
            }
        }
        let below = oy + h as i32 * scale;
        pic.text(
            (ox + cell_w / 2, below + 10),
            11.0,
            tile.caption[0].clone(),
            0,
        );
        pic.text(
            (ox + cell_w / 2, below + 24),
            11.0,
            tile.caption[1].clone(),
            0,
        );
    }
    pic
}
