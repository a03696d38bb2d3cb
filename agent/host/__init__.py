"""Host actions: the reusable things the steps and commands do to a host (apt, supervisor, Caddy,
systemd units, devpi's API and data, replication, TLS and X.509).

May import agent.facts and agent.core; never a step or a command.
"""
