"""The `soarflow <command>` modules, one per command (cli.py imports each only when it runs)."""
