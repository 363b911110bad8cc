"""Command-line commands: each `soarflow <command>` is one module here, on top of the library."""
