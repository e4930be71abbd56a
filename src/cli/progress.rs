//! The terminal face of a run: one line per finished node, and indicatif bars for the
//! running ones when stderr is a terminal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::exec::{Event, Reporter};
use crate::hint::Hint;

pub struct TermReporter {
    multi: Option<MultiProgress>,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl TermReporter {
    pub fn new(bars: bool) -> Self {
        let multi = bars.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        TermReporter {
            multi,
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn line(&self, text: String) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    fn bar(&self, id: &str) -> Option<ProgressBar> {
        self.bars.lock().ok()?.get(id).cloned()
    }

    fn drop_bar(&self, id: &str) {
        if let Some(bar) = self.bars.lock().ok().and_then(|mut b| b.remove(id)) {
            bar.finish_and_clear();
            if let Some(m) = &self.multi {
                m.remove(&bar);
            }
        }
    }

    pub fn finish(&self) {
        if let Ok(mut bars) = self.bars.lock() {
            for (_, bar) in bars.drain() {
                bar.finish_and_clear();
            }
        }
    }
}

impl Reporter for TermReporter {
    fn event(&self, event: Event<'_>) {
        match event {
            Event::Planned { .. } => {}
            Event::Cached { id } => self.line(format!("  cached  {id}")),
            Event::Started { id } => {
                if let Some(m) = &self.multi {
                    let bar = m.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} {prefix:.bold} {wide_bar} {pos}/{len} {msg} [{elapsed}]",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_prefix(id.to_string());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    if let Ok(mut bars) = self.bars.lock() {
                        bars.insert(id.to_string(), bar);
                    }
                }
                tracing::debug!(id, "started");
            }
            Event::Progress { id, progress } => {
                if let Some(bar) = self.bar(id) {
                    bar.set_length(progress.total);
                    bar.set_position(progress.done);
                    bar.set_message(progress.message.clone());
                }
            }
            Event::Finished { id, seconds } => {
                self.drop_bar(id);
                self.line(format!("     ran  {id} ({seconds:.2}s)"));
            }
            Event::Failed { id, error } => {
                self.drop_bar(id);
                let mut text = format!("  failed  {id}\nerror: {error}");
                if let Some(h) = error.hint() {
                    text += &format!("\n{}", super::hint_lines(&h));
                }
                self.line(text);
            }
            Event::Skipped { id, reason } => self.line(format!(" skipped  {id}: {reason}")),
            Event::Placed { id, place } => match self.bar(id) {
                Some(bar) => bar.set_message(place.to_string()),
                None => self.line(format!("      on  {id}: {place}")),
            },
        }
    }
}
