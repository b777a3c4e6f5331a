//! What `check` asks of a format and what it reports back (QAPI ImageCheck).
//! Formats that can check themselves implement `BlockNode::check`.

/// What a check may repair (`-r leaks`, `-r all`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckFix {
    pub leaks: bool,
    pub errors: bool,
}

/// The outcome of one check run.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: Option<u64>,
    pub total_clusters: Option<u64>,
    pub allocated_clusters: Option<u64>,
    pub fragmented_clusters: Option<u64>,
    pub compressed_clusters: Option<u64>,
    /// Lines to print to stderr, in order (what was found and repaired).
    pub messages: Vec<String>,
}
