// system tests come with the dispatcher wiring
