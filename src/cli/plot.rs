//! `simulate --plot FILE`: one SVG of the runs on a shared time axis. Token
//! requests and failed calls per 100 ms, the access tokens' expiries as
//! dashed lines, and the callers' wait for a token per second.
//!
//! Drawn with plotters' SVG backend and its built-in text layout: the SVG
//! holds `<text>` elements, so no font files, fontconfig or freetype are
//! needed. This belongs to the binary (the `cli` feature), never to the
//! library.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use token_broker::sim::scheduler::{Mode, Summary, Timeline, BUCKET};

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
    counts_panel(
        &panels[0],
        "Requests for a new access token sent to the provider, per 100 ms",
        "requests",
        end,
        runs,
        &requests,
        |summary| {
            format!(
                "{}: {} token requests",
                name(summary.mode),
                thousands(summary.token_requests)
            )
        },
        true,
    )?;
    let failed: Vec<Vec<u64>> = runs.iter().map(|(_, t)| t.failed_calls.clone()).collect();
    counts_panel(
        &panels[1],
        "Job calls that failed (the job held a dead token), per 100 ms",
        "failed calls",
        end,
        runs,
        &failed,
        |summary| format!("{}: {} failed calls", name(summary.mode), thousands(summary.failed)),
        false,
    )?;
    latency_panel(&panels[2], end, runs)
}

/// A panel of per-bucket counts, as bars side by side (one colour per
/// run) on a log scale, with the expiries as dashed lines.
#[allow(clippy::too_many_arguments)]
fn counts_panel(
    area: &Area<'_>,
    caption: &str,
    unit: &str,
    end: f64,
    runs: &[(Summary, Timeline)],
    counts: &[Vec<u64>],
    label: impl Fn(&Summary) -> String,
    expiry_legend: bool,
) -> Result<(), Failure> {
    let most = counts.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
    // Room above the tallest bar for the legend.
    let (low, high) = (0.5, (most * 40.0).max(100.0));
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 26))
        .margin(12)
        .margin_right(30)
        .x_label_area_size(40)
        .y_label_area_size(110)
        .build_cartesian_2d(0.0..end, (low..high).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .bold_line_style(BLACK.mix(0.1))
        .light_line_style(TRANSPARENT)
        .label_style((FONT, 20))
        .axis_desc_style((FONT, 22))
        .y_desc(format!("{unit} per 100 ms (log scale)"))
        .y_label_formatter(&|v| count_label(*v))
        .x_label_formatter(&|v| seconds(*v))
        .draw()?;
    let width = BUCKET.as_secs_f64();
    let share = width / runs.len().max(1) as f64;
    for (i, ((summary, timeline), counts)) in runs.iter().zip(counts).enumerate() {
        let fill = colour(summary.mode).filled();
        let bars = counts.iter().enumerate().filter(|(_, &n)| n > 0).map(|(b, &n)| {
            let left = b as f64 * width + i as f64 * share;
            Rectangle::new([(left, low), (left + share, n as f64)], fill)
        });
        chart
            .draw_series(bars)?
            .label(label(summary))
            .legend(move |(x, y)| Rectangle::new([(x, y - 8), (x + 20, y + 8)], fill));
        let line = colour(summary.mode).mix(0.7).stroke_width(2);
        for (j, &at) in timeline.expiries_s.iter().enumerate() {
            let drawn = chart.draw_series(DashedLineSeries::new([(at, low), (at, high)], 8, 6, line))?;
            if expiry_legend && j == 0 {
                drawn
                    .label(format!("{}: an access token expires", name(summary.mode)))
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], line));
            }
        }
    }
    legend(&mut chart)
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
        (least / 3.0, (most * 300.0).max(least * 1000.0))
    } else {
        (0.01, 1000.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(
            "How long a job waited for its token, per second (median and 99th percentile)",
            (FONT, 26),
        )
        .margin(12)
        .margin_right(30)
        .x_label_area_size(70)
        .y_label_area_size(110)
        .build_cartesian_2d(0.0..end, (low..high).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .bold_line_style(BLACK.mix(0.1))
        .light_line_style(TRANSPARENT)
        .label_style((FONT, 20))
        .axis_desc_style((FONT, 22))
        .y_desc("wait for a token (log scale)")
        .x_desc("seconds since the design's run started")
        .y_label_formatter(&|v| duration_label(*v))
        .x_label_formatter(&|v| seconds(*v))
        .draw()?;
    for (summary, timeline) in runs {
        let points = |pick: fn(&token_broker::sim::scheduler::Percentiles) -> f64| {
            timeline
                .latency
                .iter()
                .enumerate()
                .filter_map(move |(s, p)| p.map(|p| (s as f64 + 0.5, pick(&p).max(low))))
                .collect::<Vec<_>>()
        };
        let solid = colour(summary.mode).stroke_width(3);
        chart
            .draw_series(LineSeries::new(points(|p| p.p99_us), solid).point_size(4))?
            .label(format!("{}: 99th percentile", name(summary.mode)))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], solid));
        let dashed = colour(summary.mode).mix(0.8).stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(points(|p| p.p50_us), 8, 5, dashed))?
            .label(format!("{}: median", name(summary.mode)))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 8, y)], dashed));
    }
    legend(&mut chart)
}

fn legend<'a, X, Y>(chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>) -> Result<(), Failure>
where
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 20))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .margin(10)
        .draw()
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
