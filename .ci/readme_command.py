"""Print one of the README's two set-up commands: `demo` (install + main job) or `test` (install + all tests).

The README marks each with an HTML comment on the line before its code block, e.g. `<!-- command: test -->`.
"""

import re
import sys
from pathlib import Path


def readme_command(which: str, readme: Path = Path(__file__).resolve().parent.parent / "README.md") -> str:
    text = readme.read_text(encoding="utf-8")
    match = re.search(rf"<!-- command: {which} -->\s*```(?:bash|sh)?\n(.*?)\n```", text, re.S)
    if not match:
        raise SystemExit(f"README.md has no '<!-- command: {which} -->' code block")
    lines = [line for line in match.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 1:
        raise SystemExit(f"the README's {which} command must be one line, found {len(lines)}")
    return lines[0].strip()


if __name__ == "__main__":
    print(readme_command(sys.argv[1] if len(sys.argv) > 1 else "test"))
