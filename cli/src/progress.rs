//! Progress for long commands: an indicatif bar with -p, and a one-line report
//! on SIGUSR1 otherwise, as qemu-img does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Set by SIGUSR1; a progress report is printed at the next update.
fn usr1_flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Catch SIGUSR1 for the whole run (done first thing in main, so a signal sent
/// early never takes the default action of killing the process).
pub fn catch_usr1() {
    let _ = signal_hook::flag::register(signal_hook::consts::SIGUSR1, usr1_flag().clone());
}

/// Shared progress counter; cheap to update from any shard.
pub struct Progress {
    total: u64,
    done: AtomicU64,
    bar: Option<ProgressBar>,
    quiet: bool,
    /// Print plain percentage updates (stdout is not a terminal).
    plain: bool,
    /// Last percentage printed in plain mode, in hundredths.
    shown: AtomicU64,
}

impl Progress {
    pub fn new(total: u64, show: bool) -> Arc<Progress> {
        use std::io::IsTerminal;
        // On a terminal, a live bar; into a pipe or file, qemu-img's plain
        // "    (12.34/100%)\r" updates, so scripts that read them keep working.
        let plain = show && !std::io::stdout().is_terminal();
        let bar = (show && !plain).then(|| {
            let b = ProgressBar::with_draw_target(Some(total.max(1)), ProgressDrawTarget::stdout());
            // qemu-img's "    (12.34/100%)", followed by a bar and a rate.
            b.set_style(
                ProgressStyle::with_template("    ({pct}/100%) [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec}")
                    .expect("static template")
                    .with_key("pct", |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.2}", s.fraction() * 100.0);
                    })
                    .progress_chars("=> "),
            );
            b
        });
        let p = Arc::new(Progress { total, done: AtomicU64::new(0), bar, quiet: false, plain, shown: AtomicU64::new(u64::MAX) });
        p.print_plain(0);
        p
    }

    /// Mark the command as quiet (-q): callers ask before printing.
    pub fn with_quiet(self: Arc<Self>, quiet: bool) -> Arc<Progress> {
        match Arc::try_unwrap(self) {
            Ok(mut p) => {
                p.quiet = quiet;
                Arc::new(p)
            }
            Err(p) => p,
        }
    }

    pub fn quiet(&self) -> bool {
        self.quiet
    }

    pub fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
        self.print_plain(done);
        if usr1_flag().swap(false, Ordering::Relaxed) {
            let pct = if self.total == 0 { 100.0 } else { done as f64 * 100.0 / self.total as f64 };
            println!("    ({pct:.2}/100%)");
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.set_position(self.total);
            b.finish();
        }
        if self.plain {
            self.print_plain(self.total);
            println!();
        }
    }

    /// In plain mode, print the percentage when it moved by at least 1 %.
    fn print_plain(&self, done: u64) {
        if !self.plain {
            return;
        }
        let hundredths = if self.total == 0 { 10_000 } else { (done as u128 * 10_000 / self.total as u128) as u64 };
        let last = self.shown.load(Ordering::Relaxed);
        if last != u64::MAX && hundredths < last + 100 && hundredths != 10_000 {
            return;
        }
        if last == hundredths || self.shown.compare_exchange(last, hundredths, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return;
        }
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "    ({}.{:02}/100%)\r", hundredths / 100, hundredths % 100);
        let _ = out.flush();
    }
}
