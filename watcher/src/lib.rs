pub fn run(
    _: &protocol::config::Config,
    _: &protocol::bus::Shutdown,
) -> Result<(), protocol::stage::StageError> {
    todo!()
}
