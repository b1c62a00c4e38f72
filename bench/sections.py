"""Parts of docs/benchmarks.md that a run rewrites on its own, between HTML comment markers."""

from __future__ import annotations

import re


class Section:
    def __init__(self, name: str, before: tuple[str, ...]) -> None:
        self.begin, self.end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        self._re = re.compile(re.escape(self.begin) + r".*?" + re.escape(self.end), re.S)
        self.before = before  # a missing section goes before the first of these found

    def wrap(self, body: str) -> str:
        return f"{self.begin}\n{body.rstrip()}\n{self.end}"

    def extract(self, text: str) -> str | None:
        m = self._re.search(text)
        return m.group(0) if m else None

    def splice(self, text: str, new_section: str) -> str:
        """Put new_section in place of this section in text, or where it belongs."""
        if self._re.search(text):
            return self._re.sub(lambda _: new_section, text, count=1)
        for anchor in self.before:
            at = text.find(anchor)
            if at >= 0:
                return text[:at] + new_section + "\n\n" + text[at:]
        return text.rstrip() + "\n\n" + new_section + "\n"


PREVIEW = Section("preview-proxy", ("## Not measured yet",))
MICROVM = Section("microvm-tcg", (PREVIEW.begin, "## Preview proxy", "## Not measured yet"))
