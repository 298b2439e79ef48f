"""What `custody … --help` promises holds: every command's help renders, and the exit statuses it states are real.

In process (tests/cli_inprocess.py): a status here is the one the `custody` process would exit with.
"""

from __future__ import annotations

import importlib
import pkgutil

import click

import custody.commands as commands_package
from cli_inprocess import custody
from custody.cli import COMMAND_MODULES, cli


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    """Every command under `group`, looked up as the program looks them up (custody's are imported on demand)."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, f"custody {' '.join((*path, name))} is listed but cannot be loaded"
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def test_the_command_table_names_every_command_of_every_command_module():
    """`custody.cli.COMMAND_MODULES` is what the program can run: a command defined but not in it is unreachable."""
    defined = {}
    for info in pkgutil.iter_modules(commands_package.__path__, "custody.commands."):
        for command in importlib.import_module(info.name).commands:
            defined[command.name] = info.name
    defined |= {name: f"custody.{name}" for name in ("init", "up", "demo")}
    assert COMMAND_MODULES == defined
    assert len(list(_commands(cli))) > len(defined)  # the groups' subcommands too


def test_every_command_has_help_that_renders_and_names_its_options():
    for path, command in _commands(cli):
        shown = custody(*path, "--help")
        assert shown.returncode == 0, (path, shown.stderr)
        assert (command.help or "").strip(), f"custody {' '.join(path)} has no help text"
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.opts[-1] in shown.stdout, (path, param.opts)


def test_keys_revoke_refuses_a_time_it_cannot_read_as_a_usage_error(tmp_path):
    keyring = tmp_path / "keyring.toml"
    keyring.write_text("")
    refused = custody("keys", "revoke", "proxy+0011223344556677", "--at", "yesterday", "--keyring", str(keyring))
    assert refused.returncode == 2, refused.stderr
    assert "Invalid value for --at: 'yesterday' is not an ISO 8601 time" in refused.stderr
    assert "Traceback" not in refused.stderr and "ValueError" not in refused.stderr
    naive = custody("keys", "revoke", "proxy+0011223344556677", "--at", "2026-11-25T12:00:00", "--keyring", str(keyring))
    assert naive.returncode == 2 and "needs an offset" in naive.stderr


def test_bundle_verify_exit_statuses_are_the_ones_its_help_states(tmp_path):
    shown = custody("bundle", "verify", "--help")
    assert "exit status 0 when it verifies, 1 when anything is wrong, 2 for a usage" in " ".join(shown.stdout.split())
    not_a_bundle = tmp_path / "case.custody"
    not_a_bundle.write_bytes(b"not a zip")
    keyring = tmp_path / "keyring.toml"
    keyring.write_text("")
    wrong = custody("bundle", "verify", str(not_a_bundle), "--trust", str(keyring))
    assert wrong.returncode == 1 and "INVALID: truncated or not a bundle archive" in wrong.stdout
    keyring.write_text("garbage = [")
    unreadable = custody("bundle", "verify", str(not_a_bundle), "--trust", str(keyring))
    assert unreadable.returncode == 2 and unreadable.stderr.startswith("error: ") and "not valid TOML" in unreadable.stderr
    assert len(unreadable.stderr.strip().splitlines()) == 1
    missing = custody("bundle", "verify", str(not_a_bundle))
    assert missing.returncode == 2 and "--trust" in missing.stderr
