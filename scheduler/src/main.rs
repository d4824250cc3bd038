fn main() -> std::process::ExitCode {
    protocol::stage::stage_main(
        "scheduler",
        std::env::args_os().skip(1),
        |config, _, shutdown| scheduler::run(config, shutdown),
    )
}
