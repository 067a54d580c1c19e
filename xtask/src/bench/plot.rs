//! The figures of a run, as SVG: latency curves with and without the watchdog, lateness CDFs of
//! the watchdog and its peers, and cost against tracked connections.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::{coord::types::RangedCoordf64, prelude::*};
use serde_json::Value;

const SIZE: (u32, u32) = (800, 480);
const COLORS: [RGBColor; 5] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
];

pub fn all(r: &Value, dir: &Path) -> Result<()> {
    overhead(&r["overhead"], &dir.join("overhead-latency.svg"))?;
    lateness(&r["lateness"], &dir.join("lateness-cdf.svg"))?;
    scale(&r["scale"], &dir.join("scale.svg"))
}

fn e<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("drawing: {err:?}")
}

fn points(v: &Value) -> Vec<(f64, f64)> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
        .collect()
}

/// Latency (ms) at each percentile of the median round, baseline and watched.
fn overhead(o: &Value, path: &Path) -> Result<()> {
    let series = [
        ("nginx alone", points(&o["baseline_latency_ms"])),
        ("nginx watched (sock set)", points(&o["watched_latency_ms"])),
        (
            "nginx watched (syscalls set)",
            points(&o["syscalls"]["watched_latency_ms"]),
        ),
    ];
    let top = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(0.1, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Request latency, wrk against nginx (median round)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..100f64, 0f64..top)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .draw()
        .map_err(e)?;
    lines_with_points(&mut chart, &series)?;
    root.present().map_err(e)
}

/// Empirical CDFs of lateness (ms, log scale) for every system measured.
fn lateness(l: &Value, path: &Path) -> Result<()> {
    let series = [
        ("watchdog 500 ms, daemon-measured", &l["watchdog"]["daemon"]),
        ("watchdog 500 ms, worker + client", &l["watchdog"]["client"]),
        (
            "watchdog 1 s (gunicorn), client from send",
            &l["watchdog_1s"],
        ),
        ("uWSGI --harakiri 1, client from send", &l["uwsgi"]),
        ("gunicorn --timeout 1, client from send", &l["gunicorn"]),
    ];
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Enforcement lateness: action time − deadline",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0.01f64..3000f64).log_scale(), 0f64..1f64)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("lateness (ms, log scale)")
        .y_desc("fraction of requests")
        .draw()
        .map_err(e)?;
    for (i, (label, d)) in series.iter().enumerate() {
        let mut s: Vec<f64> = d["samples"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .map(|x| x.max(0.01))
            .collect();
        s.sort_by(f64::total_cmp);
        let n = s.len() as f64;
        let c = COLORS[i];
        chart
            .draw_series(LineSeries::new(
                s.iter().enumerate().map(|(k, x)| (*x, (k + 1) as f64 / n)),
                c.stroke_width(2),
            ))
            .map_err(e)?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
    }
    legend(&mut chart)?;
    root.present().map_err(e)
}

/// Daemon RSS and kernel map memory against tracked connections.
fn scale(s: &Value, path: &Path) -> Result<()> {
    let levels: Vec<&Value> = s["levels"].as_array().into_iter().flatten().collect();
    let get = |k: &str| -> Vec<(f64, f64)> {
        levels
            .iter()
            .filter_map(|l| Some((l["tracked"].as_f64()?, l[k].as_f64()?)))
            .collect()
    };
    let series = [
        ("daemon RSS (MiB)", get("rss_mib")),
        ("kernel maps, memlock (MiB)", get("kernel_maps_mib")),
        ("daemon CPU while idle (% of a core)", get("cpu_pct")),
    ];
    let right = levels
        .iter()
        .filter_map(|l| l["tracked"].as_f64())
        .fold(1.0, f64::max);
    let top = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.2;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Cost against tracked connections", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..right * 1.05, 0f64..top)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("tracked keep-alive connections")
        .draw()
        .map_err(e)?;
    lines_with_points(&mut chart, &series)?;
    root.present().map_err(e)
}

/// One line with a dot per point for each series, in `COLORS` order, then the legend.
fn lines_with_points<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    for (i, (label, s)) in series.iter().enumerate() {
        let c = COLORS[i];
        chart
            .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(2)))
            .map_err(e)?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        chart
            .draw_series(s.iter().map(|p| Circle::new(*p, 3, c.filled())))
            .map_err(e)?;
    }
    legend(chart)
}

fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)
}
