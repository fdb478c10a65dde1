"""``mlflowctl plugin new serving NAME``: a third-party distribution of a serving target, ready to adapt.

It passes mlflowctl's conformance kit as generated (``pip install -e '.[test]' && pytest``).
"""
from __future__ import annotations

import re
from pathlib import Path

from mlflowctl.errors import ConfigError

TEMPLATES = Path(__file__).parent / "templates" / "scaffold"
NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
#: template -> path in the new distribution (``__PACKAGE__`` replaced)
SERVING_FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "init.py.tmpl": "src/__PACKAGE__/__init__.py",
    "target.py.tmpl": "src/__PACKAGE__/target.py",
    "server.py.tmpl": "src/__PACKAGE__/server.py",
    "conftest.py.tmpl": "tests/conftest.py",
    "test_conformance.py.tmpl": "tests/test_conformance.py",
}


def new_serving_target(name: str, dest: Path) -> list[Path]:
    """Write the distribution ``mlflowctl-<name>`` into ``dest`` (which must not exist or be empty)."""
    if not NAME.match(name):
        raise ConfigError(f"plugin name {name!r}: use lower-case letters, digits and _ (starting with a letter)",
                          hint="e.g. mlflowctl plugin new serving myserver")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"{dest} exists and is not an empty folder", hint="pass another --dir")
    words = {
        "__NAME__": name,
        "__PACKAGE__": f"mlflowctl_{name}",
        "__DIST__": f"mlflowctl-{name.replace('_', '-')}",
        "__CLASS__": "".join(part.capitalize() for part in name.split("_")) + "Target",
    }
    written = []
    for template, rel in SERVING_FILES.items():
        text = (TEMPLATES / "serving" / template).read_text()
        for word, value in words.items():
            text = text.replace(word, value)
            rel = rel.replace(word, value)
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
