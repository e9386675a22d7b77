"""Loading a registry: every kind of thing edgellm has several of (architecture families,
export formats) is one module per entry, listed by name in its package; this imports them
and indexes each module's entry by its name."""

from __future__ import annotations

import importlib


def load_entries(package: str, modules: tuple[str, ...], attribute: str) -> dict:
    """{entry.name: entry} for `package.<module>.<attribute>` of each listed module, in order."""
    found = {}
    for module in modules:
        entry = getattr(importlib.import_module(f"{package}.{module}"), attribute)
        found[entry.name] = entry
    return found
