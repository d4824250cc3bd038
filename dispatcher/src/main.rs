fn main() -> std::process::ExitCode {
    protocol::stage::stage_main("dispatcher", std::env::args_os().skip(1), |c, args, s| {
        dispatcher::run(c, &args.targets, s)
    })
}
