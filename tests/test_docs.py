"""The documentation: a short README that leads to docs/, links that resolve, and every
variable the code reads described in docs/configuration.md."""

from __future__ import annotations

import re

from tests.processes import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
#: Variables the code reads that are not spelled ``EVENTFLOW_*``.
PLAIN_VARIABLES = ("REDIS_URL", "SMTP_URL", "MAIL_FROM", "PORT", "WEB_CONCURRENCY",
                   "WEB_THREADS", "PROMETHEUS_MULTIPROC_DIR", "FLOWER_BASIC_AUTH")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """The anchors a forge makes for the headings of ``markdown``."""
    found = set()
    for heading in re.findall(r"(?m)^#+ (.+)$", markdown):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_the_readme_is_a_front_door_with_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.encode()) <= 10 * 1024
    assert "make run" in text and "make test" in text
    # The contract has the README name SMTP's one window for a second copy
    assert "eventflow_ambiguous_sends_total" in text and "end of DATA" in text


def test_every_page_of_docs_is_linked_from_the_readme() -> None:
    linked = set(_LINK.findall(README.read_text()))
    assert {f"docs/{page.name}" for page in DOCS} <= linked


def test_every_relative_link_in_the_docs_resolves() -> None:
    for page in [README, ROOT / "bench" / "README.md", *DOCS]:
        for target in _LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.exists(), f"{page.name}: {target}"
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved.read_text()), f"{page.name}: {target}"


def test_every_variable_the_code_reads_is_in_the_configuration_page() -> None:
    sources = [*ROOT.glob("eventflow/**/*.py"), *ROOT.glob("tasks/*.py"),
               *ROOT.glob("*.py"), ROOT / "Procfile"]
    read = set(PLAIN_VARIABLES)
    for source in sources:
        text = source.read_text()
        read |= set(re.findall(r"[\"'](EVENTFLOW_[A-Z0-9_]*[A-Z0-9])[\"']", text))
        read |= set(re.findall(r"\$\{([A-Z_]+)", text))
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", (ROOT / "docs" / "configuration.md")
                                .read_text()))
    assert {"EVENTFLOW_MAX_RETRIES", "WORKER_LOG_LEVEL"} <= read
    assert read - documented == set()
