//! `kind = "report"`: one self-contained HTML page of a study's results.
//!
//! ```toml
//! [stages.report]
//! kind = "report"
//! inputs = ["train", "evaluate"]   # sweeps, train stages and evaluate stages, any mix
//! title = "U-Net learning-rate sweep"
//! ```
//!
//! The page holds: validation IoU per epoch for every arm on one plot (the study's
//! figure) and the loss curves; the sweep's comparison table with the selected arm
//! marked; the evaluation metrics (the study's IoU beside the honest ones) and the
//! per-case KiTS19 table; CT | truth | prediction for the evaluation slices with the
//! most foreground; and the provenance of every input (stage, kind, cache key, seed,
//! resolved parameters, kpipe version). Figures are embedded and also written as PNG
//! files under `figures/`.

use std::fmt::Write as _;
use std::path::Path;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::evaluate::Evaluate;
use super::sweep::{SweepFile, read_metrics};
use super::{CheckContext, ParamIssue, RunContext, Stage, StageError, StageRef};
use crate::figures::{Series, line_plot, overlays};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    pub inputs: Vec<StageRef>,
    #[serde(default)]
    pub title: Option<String>,
}

/// A curve per arm: (name, val IoU, train loss, val loss).
type Curves = Vec<(String, Vec<f64>, Vec<f64>, Vec<f64>)>;

impl Stage for Report {
    const KIND: &'static str = "report";

    fn check(&self, _: &CheckContext) -> Vec<ParamIssue> {
        if self.inputs.is_empty() {
            vec![ParamIssue::new(
                "inputs",
                "name at least one sweep, train or evaluate stage",
            )]
        } else {
            vec![]
        }
    }

    fn inputs(&self) -> Vec<(String, &StageRef)> {
        self.inputs
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("inputs.{i}"), r))
            .collect()
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let figures = ctx.out.join("figures");
        std::fs::create_dir_all(&figures).map_err(StageError::io("create", &figures))?;
        let title = self.title.clone().unwrap_or_else(|| "kpipe report".into());
        let mut body = String::new();
        let mut curves: Curves = Vec::new();
        let mut tables = String::new();
        let mut evaluations = String::new();
        let mut examples = String::new();
        let mut provenance = String::new();
        for r in &self.inputs {
            let dir = ctx.input_dir(r)?;
            provenance += &provenance_row(r, ctx.input(r)?);
            if dir.join(SweepFile::FILE).exists() {
                let sweep = SweepFile::read(&dir)?;
                for a in &sweep.arms {
                    curves.push((
                        a.id.clone(),
                        a.val_iou.clone(),
                        a.train_loss.clone(),
                        a.val_loss.clone(),
                    ));
                }
                let md = std::fs::read_to_string(dir.join("comparison.md")).unwrap_or_default();
                let _ = write!(
                    tables,
                    "<h3>Sweep <code>{}</code>: arms ranked by <code>{}</code> ({:?})</h3>\n{}",
                    esc(&r.0),
                    esc(&sweep.select.metric),
                    sweep.select.mode,
                    markdown_table(&md)
                );
            } else if dir.join("metrics.csv").exists() {
                let rows = read_metrics(&dir)?;
                curves.push((
                    r.0.clone(),
                    rows.iter().map(|x| x.val_iou).collect(),
                    rows.iter().map(|x| x.train_loss).collect(),
                    rows.iter().map(|x| x.val_loss).collect(),
                ));
            } else if dir.join(Evaluate::SUMMARY).exists() {
                evaluations += &evaluation_section(r, &dir)?;
                if examples.is_empty() && dir.join("examples/image.npy").exists() {
                    let png = figures.join("examples.png");
                    draw_examples(&dir.join("examples"), &png)?;
                    examples = format!(
                        "<h2>Evaluation slices with the most foreground</h2><p>CT (window, normalised) | ground truth | prediction; kidney red, tumor yellow. From <code>{}</code>.</p>{}",
                        esc(&r.0),
                        img_tag(&png)?
                    );
                }
            } else {
                return Err(StageError::Failed(format!(
                    "`{r}` is not a sweep, train or evaluate stage"
                )));
            }
        }
        let _ = write!(body, "<h1>{}</h1>", esc(&title));
        if !curves.is_empty() {
            let iou = figures.join("val_iou.png");
            let series: Vec<Series> = curves
                .iter()
                .map(|c| Series {
                    name: &c.0,
                    values: &c.1,
                })
                .collect();
            line_plot(
                &iou,
                "Validation IoU per epoch (the study's metric)",
                "mean IoU",
                &series,
            )
            .map_err(StageError::Failed)?;
            let loss = figures.join("loss.png");
            let names: Vec<(String, String)> = curves
                .iter()
                .map(|c| (format!("{} train", c.0), format!("{} val", c.0)))
                .collect();
            let mut ls: Vec<Series> = Vec::new();
            for (c, n) in curves.iter().zip(&names) {
                ls.push(Series {
                    name: &n.0,
                    values: &c.2,
                });
                ls.push(Series {
                    name: &n.1,
                    values: &c.3,
                });
            }
            line_plot(&loss, "Loss per epoch", "cross-entropy", &ls).map_err(StageError::Failed)?;
            let _ = write!(
                body,
                "<h2>Training</h2><p>Validation IoU per epoch for every arm (the study's figure: its metric on the part watched during training), then training and validation loss.</p>{}{}",
                img_tag(&iou)?,
                img_tag(&loss)?
            );
        }
        body += &tables;
        if !evaluations.is_empty() {
            let _ = write!(body, "<h2>Evaluation</h2>{evaluations}");
        }
        body += &examples;
        let _ = write!(
            body,
            "<h2>Provenance</h2><p>kpipe {}; each input's stage, kind, cache key, seed and resolved parameters.</p><table><tr><th>input</th><th>stage</th><th>kind</th><th>key</th><th>seed</th><th>parameters</th></tr>{provenance}</table>",
            env!("CARGO_PKG_VERSION")
        );
        let html = format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{}</title><style>{CSS}</style></head><body>{body}</body></html>\n",
            esc(&title)
        );
        let path = ctx.out.join("report.html");
        std::fs::write(&path, html).map_err(StageError::io("write", &path))
    }
}

const CSS: &str = "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}code{background:#f6f6f6;padding:0 3px}.sel{background:#e8f6e8;font-weight:bold}details pre{white-space:pre-wrap;font-size:12px}";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn img_tag(path: &Path) -> Result<String, StageError> {
    let bytes = std::fs::read(path).map_err(StageError::io("read", path))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok(format!(
        "<img alt=\"{name}\" src=\"data:image/png;base64,{}\">",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// A Markdown table (as the sweep writes it) as HTML; the selected row highlighted.
fn markdown_table(md: &str) -> String {
    let mut out = String::from("<table>");
    for (i, line) in md.lines().filter(|l| l.starts_with('|')).enumerate() {
        if i == 1 {
            continue; // the |---| rule
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let (tag, class) = if i == 0 {
            ("th", "")
        } else if line.contains("**selected**") {
            ("td", " class=\"sel\"")
        } else {
            ("td", "")
        };
        let _ = write!(out, "<tr{class}>");
        for c in cells {
            let c = esc(&c.replace("**selected**", "(selected)")).replace('`', "");
            let _ = write!(out, "<{tag}>{c}</{tag}>");
        }
        out += "</tr>";
    }
    out + "</table>"
}

fn num(v: &serde_json::Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.4}"))
}

fn evaluation_section(r: &StageRef, dir: &Path) -> Result<String, StageError> {
    let path = dir.join(Evaluate::SUMMARY);
    let s: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).map_err(StageError::io("read", &path))?,
    )
    .map_err(|e| StageError::Failed(e.to_string()))?;
    let mut h = format!(
        "<h3><code>{}</code> on <code>{}</code> ({} slices)</h3>",
        esc(&r.0),
        esc(s["part"].as_str().unwrap_or("")),
        s["slices"]
    );
    let _ = write!(
        h,
        "<table><tr><th>metric</th><th>value</th><th>what it is</th></tr>\
         <tr><td><b>KiTS19 kidney+tumor Dice</b></td><td><b>{}</b></td><td>the official evaluation: per case on every slice of the whole volume at its original size (label &gt; 0), mean over {} cases</td></tr>\
         <tr><td><b>KiTS19 tumor Dice</b></td><td><b>{}</b></td><td>the same for label &gt; 1; a case with no tumor in truth or prediction is skipped</td></tr>\
         <tr><td>KiTS19 score</td><td>{}</td><td>mean of the two</td></tr>\
         <tr><td>study IoU</td><td>{}</td><td>on the slice store's slices of the part (those the slice stage kept, at its size): per slice, mean IoU of background, kidney, tumor (a class absent from both counts 1), averaged over slices: the study's figure</td></tr>\
         <tr><td>IoU, present classes</td><td>{}</td><td>the same, each slice averaging only the classes present in truth or prediction</td></tr>\
         <tr><td>foreground-slice IoU</td><td>{}</td><td>the study's metric over the {} stored slices whose truth shows kidney or tumor</td></tr>\
         <tr><td>IoU background / kidney / tumor</td><td>{} / {} / {}</td><td>pooled over the stored slices' pixels</td></tr>\
         <tr><td>Dice background / kidney / tumor</td><td>{} / {} / {}</td><td>pooled over the stored slices' pixels</td></tr></table>",
        num(&s["kits"]["kidney_tumor_dice"]),
        s["kits"]["cases"],
        num(&s["kits"]["tumor_dice"]),
        num(&s["kits"]["score"]),
        num(&s["study_iou"]),
        num(&s["study_iou_present"]),
        num(&s["fg_iou"]),
        s["fg_slices"],
        num(&s["class_iou"][0]),
        num(&s["class_iou"][1]),
        num(&s["class_iou"][2]),
        num(&s["class_dice"][0]),
        num(&s["class_dice"][1]),
        num(&s["class_dice"][2]),
    );
    let csv = std::fs::read_to_string(dir.join("per_case.csv")).unwrap_or_default();
    h +=
        "<table><tr><th>case</th><th>slices</th><th>kidney+tumor Dice</th><th>tumor Dice</th></tr>";
    for line in csv.lines().skip(1) {
        let c: Vec<&str> = line.split(',').collect();
        let f = |v: &str| v.parse::<f64>().map_or("-".into(), |x| format!("{x:.4}"));
        if c.len() == 4 {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(c[0]),
                c[1],
                f(c[2]),
                f(c[3])
            );
        }
    }
    Ok(h + "</table>")
}

fn draw_examples(dir: &Path, png: &Path) -> Result<(), StageError> {
    let img: ndarray::Array3<f32> = ndarray_npy::read_npy(dir.join("image.npy"))
        .map_err(|e| StageError::Failed(e.to_string()))?;
    let truth: ndarray::Array3<u8> = ndarray_npy::read_npy(dir.join("truth.npy"))
        .map_err(|e| StageError::Failed(e.to_string()))?;
    let pred: ndarray::Array3<u8> = ndarray_npy::read_npy(dir.join("pred.npy"))
        .map_err(|e| StageError::Failed(e.to_string()))?;
    let size = img.shape()[1];
    let imgs: Vec<Vec<f32>> = img
        .outer_iter()
        .map(|a| a.iter().copied().collect())
        .collect();
    let truths: Vec<Vec<u8>> = truth
        .outer_iter()
        .map(|a| a.iter().copied().collect())
        .collect();
    let preds: Vec<Vec<u8>> = pred
        .outer_iter()
        .map(|a| a.iter().copied().collect())
        .collect();
    overlays(
        png,
        size,
        &imgs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
        &truths.iter().map(Vec::as_slice).collect::<Vec<_>>(),
        &preds.iter().map(Vec::as_slice).collect::<Vec<_>>(),
    )
    .map_err(StageError::Failed)
}

fn provenance_row(r: &StageRef, artifact: &Path) -> String {
    let Some(m) = artifact
        .parent()
        .and_then(|e| std::fs::read_to_string(e.join("manifest.json")).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    else {
        return String::new();
    };
    let params = serde_json::to_string_pretty(&m["params"]).unwrap_or_default();
    format!(
        "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td><code>{}</code></td><td>{}</td><td><details><summary>show</summary><pre>{}</pre></details></td></tr>",
        esc(&r.0),
        esc(m["stage"].as_str().unwrap_or("")),
        esc(m["kind"].as_str().unwrap_or("")),
        esc(m["key"].as_str().unwrap_or("")),
        m["seed"],
        esc(&params)
    )
}
