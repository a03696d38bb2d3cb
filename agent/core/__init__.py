"""The core: config, the run context and engine, the command runner, files, logs, crash points.

Imports nothing else of the agent's. See docs/architecture.md for the layers.
"""
