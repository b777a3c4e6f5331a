//! `ringblk`: qemu-img compatible image tool. This file parses the command line
//! and dispatches; each subcommand lives in `cmd/`.

mod cmd;
mod common;
mod progress;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ringblk", version, about = "Disk image tool on io_uring (qemu-img compatible)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options shared by commands that open an image.
#[derive(Args, Clone, Debug, Default)]
pub struct OpenArgs {
    /// Image format (probed when omitted)
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Treat the filename as an option string (driver=...,file.filename=...)
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Open read-only and share all permissions with other users of the image
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// --object secret,id=ID,data=...|file=...[,format=raw|base64]
    #[arg(long = "object")]
    pub objects: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Change format options of an image
    Amend(cmd::amend::AmendArgs),
    /// Run a simple I/O benchmark (and compare I/O backends)
    Bench(cmd::bench::BenchArgs),
    /// Check an image for consistency (and repair it with -r)
    Check(cmd::check::CheckArgs),
    /// Write an image's data into its backing file
    Commit(cmd::commit::CommitArgs),
    /// Compare the contents of two images
    Compare(cmd::compare::CompareArgs),
    /// Convert an image to another format (or copy it)
    Convert(cmd::convert::ConvertArgs),
    /// Create a new image
    Create(cmd::create::CreateArgs),
    /// Copy from one image to another, dd style (bs=, count=, skip=, if=, of=)
    Dd(cmd::dd::DdArgs),
    /// Show information about an image
    Info(cmd::info::InfoArgs),
    /// Show the allocation map of an image
    Map(cmd::map::MapArgs),
    /// Compute the size a new image would need
    Measure(cmd::measure::MeasureArgs),
    /// Change an image's backing file
    Rebase(cmd::rebase::RebaseArgs),
    /// Change the virtual size of an image
    Resize(cmd::resize::ResizeArgs),
}

fn main() {
    // A panic on a shard thread would leave the main thread waiting forever
    // for work that will never finish: report it and exit instead.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!("ringblk: internal error (a bug): exiting");
        std::process::exit(101);
    }));
    progress::catch_usr1();
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Amend(a) => cmd::amend::run(a),
        Cmd::Bench(a) => cmd::bench::run(a),
        Cmd::Check(a) => cmd::check::run(a),
        Cmd::Commit(a) => cmd::commit::run(a),
        Cmd::Compare(a) => cmd::compare::run(a),
        Cmd::Convert(a) => cmd::convert::run(a),
        Cmd::Create(a) => cmd::create::run(a),
        Cmd::Dd(a) => cmd::dd::run(a),
        Cmd::Info(a) => cmd::info::run(a),
        Cmd::Map(a) => cmd::map::run(a),
        Cmd::Measure(a) => cmd::measure::run(a),
        Cmd::Rebase(a) => cmd::rebase::run(a),
        Cmd::Resize(a) => cmd::resize::run(a),
    };
    std::process::exit(code);
}
