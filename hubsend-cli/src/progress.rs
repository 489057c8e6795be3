//! The progress display of `hubsend send` and `bench` (`--progress`): an indicatif bar on a
//! terminal (total, percentage and ETA when the input is a regular file), one plain line
//! every few seconds on anything else when asked for with `--progress always`, nothing
//! otherwise.

use std::io::{IsTerminal, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::ingest::report::Progress;

/// `--progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub(crate) enum ProgressMode {
    /// A progress bar when standard error is a terminal (and not --quiet), else nothing.
    #[default]
    Auto,
    /// Always: a bar on a terminal, one plain line every few seconds elsewhere (logs, CI).
    Always,
    /// Never.
    Never,
}

/// How often the plain (non-terminal) progress line is printed.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// Counts the bytes read through it, for the bar's position.
pub(crate) struct CountingReader<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R> CountingReader<R> {
    /// Wraps `inner`; the counter is shared with [`ProgressView::new`].
    pub(crate) fn new(inner: R, read: Arc<AtomicU64>) -> Self {
        CountingReader { inner, read }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Where progress goes.
enum View {
    Hidden,
    Bar(ProgressBar),
    Plain { last: Option<Instant> },
}

/// Draws progress snapshots as `--progress` and the terminal say.
pub(crate) struct ProgressView {
    view: View,
    /// Input bytes read so far, and the input's size when it is a regular file.
    read: Option<Arc<AtomicU64>>,
    total: Option<u64>,
}

impl ProgressView {
    /// A view for `mode`; `quiet` hides it unless `mode` is `always`. `read` counts the input
    /// bytes read and `total` is the input's size, when known.
    pub(crate) fn new(
        mode: ProgressMode,
        quiet: bool,
        read: Option<Arc<AtomicU64>>,
        total: Option<u64>,
    ) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let view = match mode {
            ProgressMode::Never => View::Hidden,
            ProgressMode::Auto if quiet || !terminal => View::Hidden,
            ProgressMode::Always if !terminal => View::Plain { last: None },
            ProgressMode::Auto | ProgressMode::Always => View::Bar(bar(total)),
        };
        ProgressView { view, read, total }
    }

    /// A view that shows nothing.
    pub(crate) fn hidden() -> Self {
        ProgressView {
            view: View::Hidden,
            read: None,
            total: None,
        }
    }

    /// Shows `p`.
    pub(crate) fn update(&mut self, p: &Progress) {
        let read = self.read.as_ref().map(|r| r.load(Ordering::Relaxed));
        match &mut self.view {
            View::Hidden => {}
            View::Bar(bar) => {
                if let Some(read) = read {
                    bar.set_position(read);
                }
                bar.set_message(counters(p));
            }
            View::Plain { last } => {
                if last.is_some_and(|t| t.elapsed() < PLAIN_EVERY) {
                    return;
                }
                *last = Some(Instant::now());
                let share = match (read, self.total) {
                    (Some(read), Some(total)) if total > 0 => {
                        format!(" ({:.0}% of the input)", read as f64 * 100.0 / total as f64)
                    }
                    _ => String::new(),
                };
                eprintln!(
                    "hubsend: progress: {} after {:.0} s{share}",
                    counters(p),
                    p.elapsed.as_secs_f64()
                );
            }
        }
    }

    /// Prints `line` on standard error without breaking the bar.
    pub(crate) fn println(&self, line: &str) {
        match &self.view {
            View::Bar(bar) => bar.suspend(|| eprintln!("{line}")),
            View::Hidden | View::Plain { .. } => eprintln!("{line}"),
        }
    }

    /// Removes the bar (the summary follows in its place).
    pub(crate) fn finish(&mut self) {
        if let View::Bar(bar) = &self.view {
            bar.finish_and_clear();
        }
        self.view = View::Hidden;
    }
}

/// A bar with a total (bytes of a regular file) or a spinner without one. Every part but the
/// message has a fixed width and the message takes what is left (`wide_msg`), so a line never
/// wraps whatever the terminal's width.
fn bar(total: Option<u64>) -> ProgressBar {
    let target = ProgressDrawTarget::stderr_with_hz(4);
    let (bar, template) = match total {
        Some(total) => (
            ProgressBar::with_draw_target(Some(total), target),
            "{percent:>3}% [{bar:20}] {bytes:>9}/{total_bytes:<9} ETA {eta:<4} {wide_msg}",
        ),
        None => (
            ProgressBar::with_draw_target(None, target),
            "{spinner} {elapsed:>4} {wide_msg}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// The counters of a snapshot, most important first (the end is cut on narrow terminals).
fn counters(p: &Progress) -> String {
    format!(
        "{} sent, {} rejected, {} failed of {} records | {:.0} ev/s, {:.2} MB/s | {} in flight, {} retries",
        p.sent,
        p.rejected,
        p.failed,
        p.records,
        p.events_per_sec(),
        p.mb_per_sec(),
        p.in_flight,
        p.retries
    )
}
