"""Facts: read-only probes of what the host is (OS, packages, services). They change nothing.

May import agent.core only.
"""
