"""MkDocs hook of the documentation site: the README is its home page, CHANGELOG.md a page.

The README is written for the repository, so its links say ``docs/torch.md``; the home page is the
same text with those links made relative to ``docs/`` (and CHANGELOG.md's to its page). One
source each, no copy to keep in step; a link that still points outside the site fails the build.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]


def on_files(files: Files, config) -> Files:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    readme = re.sub(r"\]\(docs/", "](", readme).replace("](CHANGELOG.md)", "](changelog.md)")
    files.append(File.generated(config, "index.md", content=readme))
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "changelog.md", content=changelog))
    return files
