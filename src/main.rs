//! The `blkplane` binary: the command line is `blkplane::cli`.

fn main() -> std::process::ExitCode {
    blkplane::main()
}
