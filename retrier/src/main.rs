fn main() -> std::process::ExitCode {
    protocol::stage::stage_main(
        "retrier",
        std::env::args_os().skip(1),
        |config, _, shutdown| retrier::run(config, shutdown),
    )
}
