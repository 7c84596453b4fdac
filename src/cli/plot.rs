//! `simulate --plot FILE`: one SVG of the runs on a shared time axis. Token
//! requests and failed calls per 100 ms, the access tokens' expiries as
//! dashed lines, and the callers' wait for a token per second.
//!
//! Drawn with plotters' SVG backend and its built-in text layout: the SVG
//! holds `<text>` elements, so no font files, fontconfig or freetype are
//! needed. This belongs to the binary (the `cli` feature), never to the
//! library.

use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use token_broker::sim::scheduler::{Mode, Percentiles, Summary, Timeline, BUCKET};

/// The naive design's colour (red) and the broker's (blue).
const NAIVE: RGBColor = RGBColor(214, 39, 40);
const BROKER: RGBColor = RGBColor(31, 119, 180);

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 1400;
const FONT: &str = "sans-serif";

fn colour(mode: Mode) -> RGBColor {
    match mode {
        Mode::Naive => NAIVE,
        Mode::Broker => BROKER,
    }
}

/// The name a newcomer reads in the legends.
fn name(mode: Mode) -> &'static str {
    match mode {
        Mode::Naive => "naive design",
        Mode::Broker => "token-broker",
    }
}

/// Writes the SVG of `runs` (one or two, each a summary and its timeline)
/// to `path`.
pub(crate) fn write(path: &Path, runs: &[(Summary, Timeline)]) -> Result<(), String> {
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    draw(&root, runs).map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Failure = DrawingAreaErrorKind<std::io::Error>;

fn draw(root: &Area<'_>, runs: &[(Summary, Timeline)]) -> Result<(), Failure> {
    root.fill(&WHITE)?;
    let Some((first, _)) = runs.first() else { return Ok(()) };
    let (head, body) = root.split_vertically(120);
    let headline = match runs {
        [_, _, ..] => "Many jobs, one OAuth credential: each job refreshing on its own vs token-broker",
        _ => "Many jobs, one OAuth credential",
    };
    let centre = |size: u32| TextStyle::from((FONT, size).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    let middle = WIDTH as i32 / 2;
    head.draw_text(headline, &centre(30), (middle, 16))?;
    let load = format!(
        "{} cron jobs and {} request handlers share one login; its access tokens last {}, \
         and the provider takes {} ms per token request.",
        thousands(first.jobs as u64),
        thousands(first.concurrency as u64),
        seconds(first.token_lifetime_s),
        first.provider_latency_ms
    );
    head.draw_text(&load, &centre(20).color(&BLACK.mix(0.75)), (middle, 60))?;
    let order = match runs {
        [_, _, ..] => {
            "Each design ran the same load on its own, one after the other. Dashed lines: an access token expires."
        }
        _ => "Dashed lines: an access token expires.",
    };
    head.draw_text(order, &centre(20).color(&BLACK.mix(0.75)), (middle, 88))?;

    let end = runs.iter().map(|(_, t)| t.elapsed_s).fold(1.0, f64::max);
    let panels = body.split_evenly((3, 1));
    let requests: Vec<Vec<u64>> = runs.iter().map(|(_, t)| t.token_requests_per_bucket()).collect();
    let keys = |count: &dyn Fn(&Summary) -> String, expiries: bool| -> Vec<Vec<Key>> {
        runs.iter()
            .map(|(summary, _)| {
                let mut column = vec![Key::new(Swatch::Bar, summary.mode, count(summary))];
                if expiries {
                    let label = format!("{}: an access token expires", name(summary.mode));
                    column.push(Key::new(Swatch::Dashes, summary.mode, label));
                }
                column
            })
            .collect()
    };
    let plot = head_of_panel(
        &panels[0],
        "Requests for a new access token sent to the provider, per 100 ms",
        &keys(
            &|s| format!("{}: {} token requests", name(s.mode), thousands(s.token_requests)),
            true,
        ),
    )?;
    counts_panel(&plot, "requests", end, runs, &requests)?;
    let failed: Vec<Vec<u64>> = runs.iter().map(|(_, t)| t.failed_calls.clone()).collect();
    let plot = head_of_panel(
        &panels[1],
        "Job calls that failed (the job held a dead token), per 100 ms",
        &keys(
            &|s| format!("{}: {} failed calls", name(s.mode), thousands(s.failed)),
            false,
        ),
    )?;
    counts_panel(&plot, "failed calls", end, runs, &failed)?;
    let keys: Vec<Vec<Key>> = runs
        .iter()
        .map(|(summary, _)| {
            vec![
                Key::new(
                    Swatch::Line,
                    summary.mode,
                    format!("{}: 99th percentile", name(summary.mode)),
                ),
                Key::new(Swatch::Dashes, summary.mode, format!("{}: median", name(summary.mode))),
            ]
        })
        .collect();
    let plot = head_of_panel(
        &panels[2],
        "How long a job waited for its token, per second (median and 99th percentile)",
        &keys,
    )?;
    latency_panel(&plot, end, runs)
}

/// How a legend entry shows its series.
#[derive(Clone, Copy)]
enum Swatch {
    /// A filled box, for bars.
    Bar,
    /// A solid line.
    Line,
    /// A dashed line.
    Dashes,
}

/// One legend entry.
struct Key {
    swatch: Swatch,
    colour: RGBColor,
    label: String,
}

impl Key {
    fn new(swatch: Swatch, mode: Mode, label: String) -> Self {
        Key {
            swatch,
            colour: colour(mode),
            label,
        }
    }
}

/// The left edge of the plots (room for the y labels and description).
const PLOT_LEFT: i32 = 122;
const KEY_ROW: i32 = 28;

/// Draws a panel's caption and, under it, its legend (one column per
/// design, so that no legend ever hides data); returns the area left for
/// the plot.
fn head_of_panel<'a>(area: &Area<'a>, caption: &str, columns: &[Vec<Key>]) -> Result<Area<'a>, Failure> {
    let rows = columns.iter().map(Vec::len).max().unwrap_or(0) as i32;
    let (head, plot) = area.split_vertically(48 + rows * KEY_ROW);
    let (width, _) = head.dim_in_pixel();
    let caption_style = TextStyle::from((FONT, 26).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    head.draw_text(
        caption,
        &caption_style,
        (PLOT_LEFT + (width as i32 - PLOT_LEFT) / 2, 10),
    )?;
    let label_style = TextStyle::from((FONT, 21).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let column_width = (width as i32 - PLOT_LEFT) / columns.len().max(1) as i32;
    for (c, column) in columns.iter().enumerate() {
        for (r, key) in column.iter().enumerate() {
            let x = PLOT_LEFT + 10 + c as i32 * column_width;
            let y = 56 + r as i32 * KEY_ROW;
            match key.swatch {
                Swatch::Bar => head.draw(&Rectangle::new([(x, y - 8), (x + 24, y + 8)], key.colour.filled()))?,
                Swatch::Line => head.draw(&PathElement::new([(x, y), (x + 24, y)], key.colour.stroke_width(3)))?,
                Swatch::Dashes => {
                    for dash in [x, x + 10, x + 20] {
                        head.draw(&PathElement::new(
                            [(dash, y), (dash + 5, y)],
                            key.colour.stroke_width(2),
                        ))?;
                    }
                }
            }
            head.draw_text(&key.label, &label_style, (x + 34, y))?;
        }
    }
    Ok(plot)
}

/// A chart over the whole run on a log-scale y axis, its mesh drawn.
fn chart_on<'a, 'b>(
    area: &'b Area<'a>,
    end: f64,
    (low, high): (f64, f64),
    y_desc: &str,
    x_desc: Option<&str>,
    y_label: &'b dyn Fn(&f64) -> String,
) -> Result<ChartContext<'b, SVGBackend<'a>, Cartesian2d<RangedCoordf64, LogCoord<f64>>>, Failure> {
    let mut chart = ChartBuilder::on(area)
        .margin(8)
        .margin_right(30)
        .x_label_area_size(if x_desc.is_some() { 80 } else { 40 })
        .y_label_area_size(PLOT_LEFT as u32 - 8)
        .build_cartesian_2d(0.0..end, (low..high).log_scale())?;
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh()
        .bold_line_style(BLACK.mix(0.1))
        .light_line_style(TRANSPARENT)
        .label_style((FONT, 20))
        .axis_desc_style((FONT, 22))
        .y_desc(y_desc)
        .y_label_formatter(y_label)
        .x_label_formatter(&|v| seconds(*v));
    if let Some(x_desc) = x_desc {
        mesh.x_desc(x_desc);
    }
    mesh.draw()?;
    Ok(chart)
}

/// Per-bucket counts as bars side by side (one colour per run) on a log
/// scale, with the expiries as dashed lines.
fn counts_panel(
    area: &Area<'_>,
    unit: &str,
    end: f64,
    runs: &[(Summary, Timeline)],
    counts: &[Vec<u64>],
) -> Result<(), Failure> {
    let most = counts.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
    let (low, high) = (0.5, (most * 2.0).max(10.0));
    let y_label = |v: &f64| count_label(*v);
    let mut chart = chart_on(
        area,
        end,
        (low, high),
        &format!("{unit} per 100 ms (log scale)"),
        None,
        &y_label,
    )?;
    let width = BUCKET.as_secs_f64();
    let share = width / runs.len().max(1) as f64;
    for (i, ((summary, timeline), counts)) in runs.iter().zip(counts).enumerate() {
        let fill = colour(summary.mode).filled();
        let bars = counts.iter().enumerate().filter(|(_, &n)| n > 0).map(|(b, &n)| {
            let left = b as f64 * width + i as f64 * share;
            Rectangle::new([(left, low), (left + share, n as f64)], fill)
        });
        chart.draw_series(bars)?;
        let line = colour(summary.mode).mix(0.7).stroke_width(2);
        for &at in &timeline.expiries_s {
            chart.draw_series(DashedLineSeries::new([(at, low), (at, high)], 8, 6, line))?;
        }
    }
    Ok(())
}

/// The callers' wait for a token in each second: median and 99th
/// percentile per run, on a log scale.
fn latency_panel(area: &Area<'_>, end: f64, runs: &[(Summary, Timeline)]) -> Result<(), Failure> {
    let waits = || {
        runs.iter()
            .flat_map(|(_, t)| t.latency.iter().flatten())
            .flat_map(|p| [p.p50_us, p.p99_us])
            .filter(|us| *us > 0.0)
    };
    let least = waits().fold(f64::INFINITY, f64::min);
    let most = waits().fold(0.0, f64::max);
    let (low, high) = if least.is_finite() {
        (least / 3.0, (most * 3.0).max(least * 100.0))
    } else {
        (0.01, 1000.0)
    };
    let y_label = |v: &f64| duration_label(*v);
    let mut chart = chart_on(
        area,
        end,
        (low, high),
        "wait for a token (log scale)",
        Some("seconds since the design's run started"),
        &y_label,
    )?;
    for (summary, timeline) in runs {
        let points = |pick: fn(&Percentiles) -> f64| {
            timeline
                .latency
                .iter()
                .enumerate()
                .filter_map(move |(s, p)| p.map(|p| (s as f64 + 0.5, pick(&p).max(low))))
                .collect::<Vec<_>>()
        };
        let solid = colour(summary.mode).stroke_width(3);
        chart.draw_series(LineSeries::new(points(|p| p.p99_us), solid).point_size(4))?;
        let dashed = colour(summary.mode).mix(0.8).stroke_width(2);
        chart.draw_series(DashedLineSeries::new(points(|p| p.p50_us), 8, 5, dashed))?;
    }
    Ok(())
}

/// `1`, `10`, `100`, `1,000`... for the log-scale count axes (other tick
/// values are left blank).
fn count_label(v: f64) -> String {
    if v < 1.0 || !is_power_of_ten(v) {
        return String::new();
    }
    thousands(v.round() as u64)
}

/// `10 ns`, `1 µs`, `10 ms`, `1 s`... from microseconds.
fn duration_label(us: f64) -> String {
    if !is_power_of_ten(us) {
        return String::new();
    }
    let (value, unit) = match us {
        us if us >= 1e6 => (us / 1e6, "s"),
        us if us >= 1e3 => (us / 1e3, "ms"),
        us if us >= 1.0 => (us, "µs"),
        us => (us * 1e3, "ns"),
    };
    format!("{value:.0} {unit}")
}

fn is_power_of_ten(v: f64) -> bool {
    v > 0.0 && (v.log10() - v.log10().round()).abs() < 1e-6
}

/// `2 s`, `0.5 s`.
fn seconds(s: f64) -> String {
    let text = format!("{s:.1}");
    format!("{} s", text.strip_suffix(".0").unwrap_or(&text))
}

/// `476,864`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(seconds(2.0), "2 s");
        assert_eq!(seconds(0.5), "0.5 s");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(476_864), "476,864");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(count_label(1000.0), "1,000");
        assert_eq!(count_label(2.0), "");
        assert_eq!(duration_label(0.01), "10 ns");
        assert_eq!(duration_label(100.0), "100 µs");
        assert_eq!(duration_label(10_000.0), "10 ms");
        assert_eq!(duration_label(3.0), "");
    }
}
