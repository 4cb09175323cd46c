"""A sweep file's options: `key=value,flag,...` as `--sweep=<file>.py:<options>` passes them."""

from __future__ import annotations


def parse_options(arg: str | None, valid) -> dict:
    """{key: value} ({flag: True} for a bare name); a ValueError names any option not in `valid`."""
    out = {}
    for part in (arg or "").split(","):
        part = part.strip()
        if part:
            key, _, value = part.partition("=")
            out[key] = value if value else True
    unknown = set(out) - set(valid)
    if unknown:
        raise ValueError(f"unknown sweep option(s) {', '.join(sorted(unknown))}; valid: {', '.join(valid)}")
    return out
