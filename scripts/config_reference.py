"""Writes the configuration reference table from ``config.Settings``.

    python scripts/config_reference.py            # print the table
    python scripts/config_reference.py --write F  # replace the table in F
    python scripts/config_reference.py --check F  # exit 1 when F's table is stale

The table sits between ``<!-- config:begin -->`` and ``<!-- config:end -->``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracking_grpc.config import ENV_PREFIX, Settings  # noqa: E402

BEGIN = "<!-- config:begin -->"
END = "<!-- config:end -->"


def table() -> str:
    """The Markdown table: setting, environment variable, default, meaning."""
    lines = [
        "| setting | environment variable | default | meaning |",
        "|---|---|---|---|",
    ]
    for spec in fields(Settings):
        env = ENV_PREFIX + spec.name.upper()
        default = f"`{spec.default}`" if spec.default != "" else "(empty)"
        meaning = spec.metadata["help"].replace("|", "\\|")
        lines.append(f"| `{spec.name}` | `{env}` | {default} | {meaning} |")
    return "\n".join(lines) + "\n"


def replaced(text: str, new_table: str) -> str:
    """``text`` with the part between the markers replaced by ``new_table``."""
    head, begin, rest = text.partition(BEGIN)
    _old, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"markers {BEGIN} and {END} not found")
    return f"{head}{BEGIN}\n{new_table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, help="update the table in this file")
    group.add_argument("--check", type=Path, help="fail when this file's table differs")
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(replaced(args.write.read_text(), table()))
        return 0
    if args.check:
        current = args.check.read_text()
        if replaced(current, table()) != current:
            print(
                f"{args.check}: configuration table is stale; run --write",
                file=sys.stderr,
            )
            return 1
        return 0
    sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
