"""The `kdfleet hub` commands, one module per group.

Each group module's `register(sub)` adds its subcommands to the parser that
hub.cli builds, and sets `handler` on each: a function of the parsed
arguments that returns the exit code. `common` holds what the groups share:
the flags, the settings they make, the database and the image store.
"""
