"""Write (or with --check, verify) the config reference section of README.md from the schema.

    python tools/config_reference.py          # rewrite the section between the markers
    python tools/config_reference.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torchtitan_like.config.reference import README_BEGIN, README_END, markdown_reference

README = Path(__file__).resolve().parent.parent / "README.md"


def render(text: str) -> str:
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{markdown_reference()}\n{README_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the config reference section of README.md from the schema.")
    parser.add_argument("--check", action="store_true", help="only check: exit 1 if README.md is out of date")
    args = parser.parse_args(argv)  # (an unknown argument, a typo of --check, must not rewrite README.md)
    text = README.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        if new != text:
            print("README.md config reference is stale: run python tools/config_reference.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
