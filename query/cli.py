"""The `custody` commands this package contributes."""

import click

commands: list[click.Command] = []
