fn main() {
    std::process::exit(kpipe::cli::main());
}
