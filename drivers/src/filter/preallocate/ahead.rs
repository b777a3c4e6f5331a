//! Work the filter does behind the writer: extending the file ahead of it,
//! and starting writeback of what it has written (through the page cache).

use super::{align_up, PreallocNode, STREAMING};

impl PreallocNode {
    /// Start writeback of the data grown since the last write-behind, up
    /// to one step behind the data's end (the writes still in flight land
    /// in that step, and pages under writeback would make them wait).
    pub(super) fn maybe_write_behind(&self) {
        let (Some(fd), step) = (&self.behind_fd, self.cfg.write_behind) else { return };
        let (from, to) = {
            let mut s = self.state();
            let to = s.data_end.saturating_sub(step) / step * step;
            if s.behind_running || to < s.behind.saturating_add(step) {
                return;
            }
            s.behind_running = true;
            (s.behind, to)
        };
        let (fd, Some(me)) = (fd.clone(), self.me.upgrade()) else { return };
        engine::runtime::spawn_daemon(async move {
            engine::aio::blocking(move || {
                use std::os::fd::AsRawFd;
                // SAFETY: an fd of our own, kept open by the Arc; the call
                // only starts writeback of the range's dirty pages. A
                // failure costs nothing: the flush writes them anyway.
                unsafe {
                    libc::sync_file_range(
                        fd.as_raw_fd(),
                        from as libc::off64_t,
                        (to - from) as libc::off64_t,
                        libc::SYNC_FILE_RANGE_WRITE,
                    )
                }
            })
            .await;
            {
                let mut s = me.state();
                s.behind = to;
                s.behind_running = false;
            }
            me.maybe_write_behind();
        });
    }

    /// Start the next extension in the background if the data has come
    /// near the file's end: within half a step, plus what the writer wrote
    /// while the last extension ran. An allocator slower than its writer
    /// thus runs back to back instead of waiting for the writer to come near
    /// again (on the slowfs rig, allocating 1 GiB takes longer than writing
    /// it).
    pub(super) fn maybe_ahead(&self) {
        let start = {
            let mut s = self.state();
            let near = s.file_end.saturating_sub(s.data_end) < (s.step / 2).saturating_add(s.lead);
            if !self.cfg.ahead || s.failed || s.ahead_running || !near {
                return;
            }
            s.ahead_running = true;
            // A writer that caught up with the last step soon after it was
            // taken gets a step twice as large, so that it takes longer to
            // catch up again, as long as allocating is cheap per byte; one
            // that took its time goes back to the first.
            let now = std::time::Instant::now();
            let streaming = s.last_ahead.is_some_and(|t| now.duration_since(t) < STREAMING);
            s.step = match (streaming, s.cheap) {
                (true, true) => (s.step * 2).min(self.cfg.max_size),
                (true, false) => s.step,
                (false, _) => self.cfg.size,
            };
            if !streaming {
                s.lead = 0;
            }
            s.last_ahead = Some(now);
            Some(())
        };
        let (Some(()), Some(me)) = (start, self.me.upgrade()) else { return };
        engine::runtime::spawn_daemon(async move {
            let one = me.growing.begin(0, u64::MAX, true).await;
            let (file_end, data_end, step) = {
                let s = me.state();
                (s.file_end, s.data_end, s.step)
            };
            let target = align_up(data_end.max(file_end).saturating_add(step), me.cfg.align);
            if target > file_end {
                if let Err(e) = me.extend(file_end, target).await {
                    eprintln!("{e}");
                }
            }
            {
                let mut s = me.state();
                s.lead = s.data_end.saturating_sub(data_end).min(me.cfg.max_size);
                s.ahead_running = false;
            }
            drop(one);
            me.maybe_ahead();
        });
    }
}
