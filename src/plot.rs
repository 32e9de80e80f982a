//! `lewel plot RUN [RUN...] --out curves.png`: the curves of run folders from their metrics.jsonl,
//! as one PNG of four panels: the loss (each step, light, and each epoch's mean, dots) and the
//! learning rate and EMA momentum against steps, the kNN monitor's accuracy against epochs
//! (epoch 0: at init). Several runs are overlaid, one colour each, with a legend naming each
//! folder.
//!
//! Drawn by plotters into an RGB buffer, text in DejaVu Sans (assets/fonts, embedded), encoded by
//! zune-png and written atomically.

use crate::data::pil::Rgb8;
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The PNG's width and height in pixels.
pub const SIZE: (u32, u32) = (1600, 1000);

/// DejaVu Sans 2.37 (Debian's fonts-dejavu-core), unmodified; its license is
/// assets/fonts/DejaVuSans-LICENSE.
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Tableau's ten colours: distinct, and readable on white.
const COLOURS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// One step record of metrics.jsonl.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPoint {
    pub step: u64,
    pub epoch: Option<u64>,
    pub loss: f64,
    pub lr: Option<f64>,
    pub ema_m: Option<f64>,
}

/// One epoch record (epoch 0: the kNN monitor at init).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochPoint {
    pub epoch: u64,
    pub mean_loss: Option<f64>,
    pub knn_acc: Option<f64>,
}

/// A run's curves, by step and by epoch (a record repeated after a resume: the last one).
#[derive(Clone, Debug)]
pub struct Curves {
    /// The run folder as given.
    pub name: String,
    pub steps: Vec<StepPoint>,
    pub epochs: Vec<EpochPoint>,
}

/// What `plot` drew.
#[derive(Debug)]
pub struct PlotSummary {
    /// The runs drawn: name, steps, epochs done (with a mean loss).
    pub runs: Vec<(String, usize, usize)>,
    /// Runs left out because they have no step yet.
    pub empty: Vec<String>,
}

/// Reads a run folder's metrics.jsonl. A last line without its newline that does not parse is a
/// record being written (the run is live) and is left out; any other bad line is an error naming
/// the file and the line.
pub fn read_run(dir: &Path) -> Result<Curves> {
    let name = dir.components().as_path().display().to_string();
    if !dir.is_dir() {
        let what = if dir.exists() {
            "is not a folder"
        } else {
            "does not exist"
        };
        return Err(Error::user(format!(
            "{name}: {what}; expected a run folder holding metrics.jsonl"
        )));
    }
    let path = dir.join("metrics.jsonl");
    if !path.is_file() {
        return Err(Error::user(format!(
            "{name}: no metrics.jsonl; expected a lewel run folder (lewel pretrain --out)"
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let p = path.display();
    let n_lines = text.lines().count();
    let mut steps = BTreeMap::new();
    let mut epochs: BTreeMap<u64, EpochPoint> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let at = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if at == n_lines && !text.ends_with('\n') => continue,
            Err(e) => {
                return Err(Error::user(format!(
                    "{p}: line {at}: expected a JSON record, got {:?} ({e})",
                    clip(line)
                )))
            }
        };
        let Some(o) = v.as_object() else {
            return Err(Error::user(format!(
                "{p}: line {at}: expected a JSON object, got {:?}",
                clip(line)
            )));
        };
        let whole = |k: &str| -> Result<Option<u64>> {
            match o.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x.as_u64().map(Some).ok_or_else(|| {
                    Error::user(format!(
                        "{p}: line {at}: expected \"{k}\" to be a whole number, got {x}"
                    ))
                }),
            }
        };
        let number = |k: &str| -> Result<Option<f64>> {
            match o.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x.as_f64().map(Some).ok_or_else(|| {
                    Error::user(format!(
                        "{p}: line {at}: expected \"{k}\" to be a number, got {x}"
                    ))
                }),
            }
        };
        if let Some(step) = whole("step")? {
            if o.get("skipped_update").is_some() && number("loss")?.is_none() {
                // A step whose update --on-nan skip undid: no loss to draw.
                steps.remove(&step);
                continue;
            }
            let loss = number("loss")?.ok_or_else(|| {
                Error::user(format!(
                    "{p}: line {at}: a step record without its \"loss\""
                ))
            })?;
            let s = StepPoint {
                step,
                epoch: whole("epoch")?,
                loss,
                lr: number("lr")?,
                ema_m: number("ema_m")?,
            };
            steps.insert(step, s);
        } else if let Some(epoch) = whole("epoch")? {
            epochs.insert(
                epoch,
                EpochPoint {
                    epoch,
                    mean_loss: number("mean_loss")?,
                    knn_acc: number("knn_acc")?,
                },
            );
        }
        // Records of other kinds are not curves.
    }
    Ok(Curves {
        name,
        steps: steps.into_values().collect(),
        epochs: epochs.into_values().collect(),
    })
}

/// A line shown in an error: at most 60 characters.
fn clip(line: &str) -> String {
    match line.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line.to_string(),
    }
}

/// `--out`: a .png file name in a folder that exists.
fn check_out(out: &Path) -> Result<()> {
    let o = out.display();
    let png = out
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !png {
        return Err(Error::user(format!(
            "--out {o}: expected a file name ending in .png"
        )));
    }
    if out.is_dir() {
        return Err(Error::user(format!(
            "--out {o}: is a folder; expected a .png file name"
        )));
    }
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(Error::user(format!(
            "--out {o}: the folder {} does not exist",
            dir.display()
        )));
    }
    Ok(())
}

/// Draws the runs' curves into `out` (a PNG of `SIZE`, written atomically).
pub fn plot(runs: &[PathBuf], out: &Path) -> Result<PlotSummary> {
    check_out(out)?;
    if runs.is_empty() {
        return Err(Error::user("lewel plot: name at least one run folder"));
    }
    let all = runs
        .iter()
        .map(|r| read_run(r))
        .collect::<Result<Vec<_>>>()?;
    let (curves, empty): (Vec<Curves>, Vec<Curves>) =
        all.into_iter().partition(|c| !c.steps.is_empty());
    if curves.is_empty() {
        let names: Vec<&str> = empty.iter().map(|c| c.name.as_str()).collect();
        return Err(Error::user(format!(
            "{}: no steps logged yet (metrics.jsonl has no step records); nothing to plot",
            names.join(", ")
        )));
    }
    let img = draw(&curves)?;
    crate::data::show::write_png(&img, out)?;
    Ok(PlotSummary {
        runs: curves
            .iter()
            .map(|c| {
                let done = c.epochs.iter().filter(|e| e.mean_loss.is_some()).count();
                (c.name.clone(), c.steps.len(), done)
            })
            .collect(),
        empty: empty.into_iter().map(|c| c.name).collect(),
    })
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid font (the plot test draws with it); a failure shows as no text.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// How a series is drawn.
#[derive(Clone, Copy)]
enum Look {
    /// A thin line in a pale shade of the colour (each step's loss).
    Faint,
    /// A line.
    Line,
    /// A line with a dot at each point.
    Dots,
}

struct Series {
    points: Vec<(f64, f64)>,
    colour: RGBColor,
    look: Look,
    /// The legend entry, if any.
    label: Option<String>,
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn draw_err(e: impl std::fmt::Display) -> Error {
    Error::Other(format!("lewel plot: drawing failed: {e}"))
}

/// The four panels of `curves` as an RGB image.
pub fn draw(curves: &[Curves]) -> Result<Rgb8> {
    register_font();
    let (w, h) = SIZE;
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let panels = root.split_evenly((2, 2));
        let colour = |i: usize| {
            let (r, g, b) = COLOURS[i % COLOURS.len()];
            RGBColor(r, g, b)
        };
        let pale = |c: RGBColor| {
            let m = |v: u8| (v as f64 * 0.4 + 255.0 * 0.6) as u8;
            RGBColor(m(c.0), m(c.1), m(c.2))
        };
        let by_step = |f: &dyn Fn(&StepPoint) -> Option<f64>, c: &Curves| -> Vec<(f64, f64)> {
            c.steps
                .iter()
                .filter_map(|s| Some((s.step as f64, f(s)?)))
                .filter(|p| p.1.is_finite())
                .collect()
        };

        let mut loss = Vec::new();
        for (i, c) in curves.iter().enumerate() {
            loss.push(Series {
                points: by_step(&|s| Some(s.loss), c),
                colour: pale(colour(i)),
                look: Look::Faint,
                label: None,
            });
        }
        for (i, c) in curves.iter().enumerate() {
            // An epoch's mean at the epoch's last step.
            let mut end = BTreeMap::new();
            for s in &c.steps {
                if let Some(e) = s.epoch {
                    end.insert(e, s.step);
                }
            }
            let points = c
                .epochs
                .iter()
                .filter_map(|e| Some((*end.get(&e.epoch)? as f64, e.mean_loss?)))
                .collect();
            loss.push(Series {
                points,
                colour: colour(i),
                look: Look::Dots,
                label: Some(c.name.clone()),
            });
        }
        let line = |f: &dyn Fn(&StepPoint) -> Option<f64>| -> Vec<Series> {
            curves
                .iter()
                .enumerate()
                .map(|(i, c)| Series {
                    points: by_step(f, c),
                    colour: colour(i),
                    look: Look::Line,
                    label: Some(c.name.clone()),
                })
                .collect()
        };
        let lr = line(&|s| s.lr);
        let ema = line(&|s| s.ema_m);
        let knn: Vec<Series> = curves
            .iter()
            .enumerate()
            .map(|(i, c)| Series {
                points: c
                    .epochs
                    .iter()
                    .filter_map(|e| Some((e.epoch as f64, e.knn_acc?)))
                    .collect(),
                colour: colour(i),
                look: Look::Dots,
                label: Some(c.name.clone()),
            })
            .collect();

        let last_step = curves.iter().flat_map(|c| &c.steps).map(|s| s.step).max();
        let steps = 0.0..last_step.unwrap_or(1).max(1) as f64;
        let last_epoch = curves
            .iter()
            .flat_map(|c| {
                c.epochs
                    .iter()
                    .map(|e| e.epoch)
                    .chain(c.steps.iter().filter_map(|s| s.epoch))
            })
            .max();
        // A margin each side, so the dots at the first and last epoch show whole.
        let last_epoch = last_epoch.unwrap_or(1).max(1) as f64;
        let epochs = -0.04 * last_epoch..1.04 * last_epoch;
        use SeriesLabelPosition as P;
        panel(
            &panels[0],
            "loss (light: each step, dots: epoch mean)",
            ("step", "loss"),
            steps.clone(),
            &loss,
            P::UpperRight,
        )?;
        panel(
            &panels[1],
            "learning rate",
            ("step", "lr"),
            steps.clone(),
            &lr,
            P::LowerMiddle,
        )?;
        panel(
            &panels[2],
            "EMA momentum",
            ("step", "m"),
            steps,
            &ema,
            P::LowerRight,
        )?;
        panel(
            &panels[3],
            "kNN accuracy (%)",
            ("epoch", "top-1 %"),
            epochs,
            &knn,
            P::LowerRight,
        )?;
        root.present().map_err(draw_err)?;
    }
    Ok(Rgb8 {
        w: w as usize,
        h: h as usize,
        data: buf,
    })
}

/// The y range of a panel's points, with a margin; a flat curve gets a band around its value.
fn y_range(series: &[Series]) -> Range<f64> {
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = if hi > lo {
        (hi - lo) * 0.06
    } else {
        lo.abs().max(1e-3) * 0.05
    };
    (lo - pad)..(hi + pad)
}

/// A tick label: as many decimals as the range needs, scientific for tiny values.
fn tick(v: f64, span: f64, scale: f64) -> String {
    if scale > 0.0 && scale < 1e-3 {
        return format!("{v:.1e}");
    }
    let decimals = if span > 0.0 {
        (-(span / 5.0).log10()).ceil().clamp(0.0, 8.0) as usize
    } else {
        3
    };
    format!("{v:.decimals$}")
}

fn panel(
    area: &Area<'_>,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    xs: Range<f64>,
    series: &[Series],
    legend: SeriesLabelPosition,
) -> Result<()> {
    let ys = y_range(series);
    let y_span = ys.end - ys.start;
    let y_scale = ys.start.abs().max(ys.end.abs());
    let empty = series.iter().all(|s| s.points.is_empty());
    let caption = if empty {
        format!("{title}: none logged")
    } else {
        title.to_string()
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 26))
        .margin(14)
        .x_label_area_size(52)
        .y_label_area_size(92)
        .build_cartesian_2d(xs, ys)
        .map_err(draw_err)?;
    // Steps and epochs are whole: a tick between two has no label.
    let whole = |v: &f64| {
        if v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            String::new()
        }
    };
    let y_tick = |v: &f64| tick(*v, y_span, y_scale);
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(8)
        .y_labels(7)
        .x_label_formatter(&whole)
        .y_label_formatter(&y_tick)
        .label_style((FAMILY, 17))
        .axis_desc_style((FAMILY, 19))
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(draw_err)?;
    let mut labelled = false;
    for s in series.iter().filter(|s| !s.points.is_empty()) {
        let c = s.colour;
        let drawn = match s.look {
            Look::Faint => chart.draw_series(LineSeries::new(s.points.clone(), c.stroke_width(1))),
            Look::Line => chart.draw_series(LineSeries::new(s.points.clone(), c.stroke_width(2))),
            Look::Dots => chart
                .draw_series(LineSeries::new(s.points.clone(), c.stroke_width(2)).point_size(4)),
        }
        .map_err(draw_err)?;
        if let Some(l) = &s.label {
            labelled = true;
            drawn.label(l.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
            });
        }
    }
    if labelled {
        chart
            .configure_series_labels()
            .position(legend)
            .label_font((FAMILY, 17))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lewel-plot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn plot_reads_records_keeps_the_last_of_a_step_and_names_bad_lines() {
        let d = tmp("read");
        std::fs::write(
            d.join("metrics.jsonl"),
            concat!(
                "{\"epoch\":0,\"knn_acc\":10.0}\n",
                "{\"step\":1,\"epoch\":1,\"loss\":4.0,\"lr\":0.1,\"ema_m\":0.9,\"ms\":3.0}\n",
                "{\"step\":2,\"epoch\":1,\"loss\":3.5,\"lr\":0.2,\"ema_m\":0.91}\n",
                "{\"step\":2,\"epoch\":1,\"loss\":3.0,\"lr\":0.2,\"ema_m\":0.91}\n",
                "\n",
                "{\"epoch\":1,\"knn_acc\":null,\"mean_loss\":3.5}\n",
                "{\"step\":3,\"epoch\":2,\"loss\":null,\"skipped_update\":\"the loss is NaN\"}\n",
                "{\"note\":\"other\"}\n",
                "{\"step\":3,\"epo"
            ),
        )
        .unwrap();
        let c = read_run(&d).unwrap();
        assert_eq!(
            c.steps.len(),
            2,
            "a skipped step has no point; the torn last line is being written"
        );
        assert_eq!(c.steps[1].loss, 3.0, "a step logged again: the last one");
        assert_eq!(c.steps[0].lr, Some(0.1));
        assert_eq!(
            c.epochs,
            vec![
                EpochPoint {
                    epoch: 0,
                    mean_loss: None,
                    knn_acc: Some(10.0)
                },
                EpochPoint {
                    epoch: 1,
                    mean_loss: Some(3.5),
                    knn_acc: None
                }
            ]
        );
        for (text, says) in [
            (
                "{\"step\":1,\"loss\":1.0}\nnot json\n",
                "line 2: expected a JSON record",
            ),
            ("[1,2]\n", "line 1: expected a JSON object"),
            (
                "{\"step\":-1,\"loss\":1.0}\n",
                "line 1: expected \"step\" to be a whole number",
            ),
            (
                "{\"step\":1,\"loss\":\"x\"}\n",
                "line 1: expected \"loss\" to be a number",
            ),
            (
                "{\"step\":1}\n",
                "line 1: a step record without its \"loss\"",
            ),
        ] {
            std::fs::write(d.join("metrics.jsonl"), text).unwrap();
            let e = read_run(&d).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            let m = e.to_string();
            assert!(m.contains("metrics.jsonl: ") && m.contains(says), "{m}");
        }
    }

    #[test]
    fn plot_tick_labels_fit_the_range() {
        assert_eq!(tick(0.92, 0.1, 1.0), "0.92");
        assert_eq!(tick(42.0, 40.0, 60.0), "42");
        assert_eq!(tick(3.3, 2.0, 5.0), "3.3");
        assert_eq!(tick(2e-5, 4e-5, 5e-5), "2.0e-5");
    }
}
