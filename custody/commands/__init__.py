"""The click commands of `custody`, one module per area; `custody.cli` assembles them.

They live here, above the packages, because a command reads the config file and
wires packages together: only the roof may import `custody.config`.
"""
