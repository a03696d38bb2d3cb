"""The command line: `apply`/`plan` and the day-2 commands. The top layer: may import anything."""
