"""The `kdfleet` programs: the command that dispatches to each service, the local demo, a site as local
processes (`fleet up`), and the signing-key and package commands. `shared/` holds what the services
speak to each other; this package only runs things."""
