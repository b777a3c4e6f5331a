//! Progress for long commands: an indicatif bar with -p, and a one-line report
//! on SIGUSR1 otherwise, as qemu-img does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Shared progress counter; cheap to update from any shard.
pub struct Progress {
    total: u64,
    done: AtomicU64,
    bar: Option<ProgressBar>,
    usr1: Arc<AtomicBool>,
    quiet: bool,
}

impl Progress {
    pub fn new(total: u64, show: bool) -> Arc<Progress> {
        let bar = show.then(|| {
            let b = ProgressBar::with_draw_target(Some(total.max(1)), ProgressDrawTarget::stdout());
            b.set_style(
                ProgressStyle::with_template("    ({percent_precise}/100%) [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            b
        });
        let usr1 = Arc::new(AtomicBool::new(false));
        let _ = signal_hook::flag::register(signal_hook::consts::SIGUSR1, usr1.clone());
        Arc::new(Progress { total, done: AtomicU64::new(0), bar, usr1, quiet: false })
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
        if self.usr1.swap(false, Ordering::Relaxed) {
            let pct = if self.total == 0 { 100.0 } else { done as f64 * 100.0 / self.total as f64 };
            println!("    ({pct:.2}/100%)");
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.set_position(self.total);
            b.finish();
        }
    }
}
