"""The Avro schemas: the one source of truth for the wire format.

Kept as package data so that every component (and an auditor's tooling) reads the
very same `.avsc` files; see schemas/README.md for the evolution rule.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def load_json(name: str) -> dict[str, Any]:
    """The parsed JSON of `schemas/<name>` (e.g. ``event.avsc``)."""
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))
