//! Ranges of the file the filter added and nobody has written since.

/// Ranges of the file past the data's end when they were added (by an
/// extension, or a truncate that grew the file) and never written since,
/// sorted and disjoint. The filesystem may call them data (ext4 does, for
/// unwritten blocks under a cached folio); they read as zeroes, and block
/// status says so, as it would for the holes of a file grown by writes.
#[derive(Default)]
pub(super) struct Unwritten(Vec<(u64, u64)>);

/// Ranges kept at most: a random writer in the preallocated area could cut
/// it into many; past this the smallest are forgotten (then reported as
/// the filesystem sees them, which is never wrong, only less sparse).
const MAX_UNWRITTEN: usize = 1024;

impl Unwritten {
    pub(super) fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        self.remove(start, end);
        let i = self.0.partition_point(|&(s, _)| s < start);
        self.0.insert(i, (start, end));
        // Merge with touching neighbours.
        if i + 1 < self.0.len() && self.0[i + 1].0 == end {
            self.0[i].1 = self.0[i + 1].1;
            self.0.remove(i + 1);
        }
        if i > 0 && self.0[i - 1].1 == start {
            self.0[i - 1].1 = self.0[i].1;
            self.0.remove(i);
        }
        if self.0.len() > MAX_UNWRITTEN {
            let k = (0..self.0.len()).min_by_key(|&k| self.0[k].1 - self.0[k].0).unwrap_or(0);
            self.0.remove(k);
        }
    }

    pub(super) fn remove(&mut self, start: u64, end: u64) {
        if start >= end || self.0.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(s, e) in &self.0 {
            if e <= start || s >= end {
                out.push((s, e));
                continue;
            }
            if s < start {
                out.push((s, start));
            }
            if e > end {
                out.push((end, e));
            }
        }
        self.0 = out;
    }

    /// The unwritten range holding `off` (its end), or the start of the next
    /// one after `off` (None: none).
    pub(super) fn at(&self, off: u64) -> (Option<u64>, Option<u64>) {
        let i = self.0.partition_point(|&(_, e)| e <= off);
        match self.0.get(i) {
            Some(&(s, e)) if s <= off => (Some(e), None),
            Some(&(s, _)) => (None, Some(s)),
            None => (None, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Unwritten;

    #[test]
    fn unwritten_ranges_stay_sorted_merged_and_disjoint() {
        let mut u = Unwritten::default();
        u.add(100, 200);
        u.add(0, 50);
        u.add(200, 300); // touches: merged
        u.add(50, 100); // fills the gap: one range
        assert_eq!(u.0, vec![(0, 300)]);
        u.remove(120, 130);
        u.remove(290, 400);
        assert_eq!(u.0, vec![(0, 120), (130, 290)]);
        u.add(400, 500);
        u.add(125, 450); // overlaps two: they become one
        assert_eq!(u.0, vec![(0, 120), (125, 500)]);
        assert_eq!(u.at(0), (Some(120), None));
        assert_eq!(u.at(120), (None, Some(125)));
        assert_eq!(u.at(499), (Some(500), None));
        assert_eq!(u.at(500), (None, None));
    }
}
