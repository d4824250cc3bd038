fn main() -> std::process::ExitCode {
    protocol::stage::stage_main(
        "filter",
        std::env::args_os().skip(1),
        |config, _, shutdown| filter::run(config, shutdown),
    )
}
