//! The `lumen` binary: parse the command line and run it (see `lumen::cli`).

use std::process::ExitCode;

use clap::Parser;

// Tensor ops allocate large short-lived buffers; mimalloc reuses them instead
// of returning them to the OS and page-faulting them back in.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = lumen::cli::Cli::parse();
    lumen::server::init_logging(cli.log_format());
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        // Stopped on a signal: the shell's convention, 128 + its number.
        Err(lumen::Error::Interrupted { signal }) => {
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
