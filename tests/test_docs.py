"""The documentation stays true to the repository: every relative link leads to a file (and heading) that exists,
every `samf`, `samf-train`, `samf-export` and `make` command shown in a code block exists with the options it
is shown with, and the README stays a newcomer's page. Fast: no model, no torch; the click groups are read as
objects, so a renamed command or option fails here."""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 200


def _pages() -> list:
    docs = os.path.join(ROOT, "docs")
    return (["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(docs) if f.endswith(".md"))
            + ["benchmarks/README.md"])


def _read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?^[ \t]*\1[ \t]*$", re.S | re.M)  # a code block, indented too


def _code_blocks(text: str) -> list:
    return [m.group(0).split("\n", 1)[1].rsplit("\n", 1)[0] for m in FENCE.finditer(text)]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (markup too), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: str) -> set:
    seen, out = {}, set()
    for line in FENCE.sub("", _read(page)).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(page: str) -> list:
    """Relative link targets outside code (fenced blocks and inline code are not markdown)."""
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", _read(page)))
    return [t for t in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", _pages())
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, dest)):
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest}")
    assert not broken, f"{page}: " + "; ".join(broken)


def test_the_readme_stays_a_newcomers_page():
    lines = _read("README.md").count("\n")
    assert lines < README_MAX_LINES, (f"README.md has {lines} lines (under {README_MAX_LINES}): move detail into the "
                                      "page of its reader under docs/ and link it")
    for page in ("docs/training.md", "docs/service.md", "docs/security.md", "benchmarks/README.md"):
        assert os.path.basename(page) in _read("README.md"), f"the README's 'Where to read next' lost {page}"


def _groups() -> dict:
    from samf.cli.export_cli import main as export
    from samf.cli.samf_cli import main as samf
    from samf.cli.train_cli import main as train

    return {"samf": samf, "samf-train": train, "samf-export": export}


def _shown_commands(text: str):
    """``(program, args)`` for every command line of the page's code blocks: continuation lines joined, comments
    dropped; ``torchrun … -m samf.cli.train_cli -- STAGE`` counts as ``samf-train STAGE``."""
    modules = {"samf_cli": "samf", "train_cli": "samf-train", "export_cli": "samf-export"}
    for block in _code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip().lstrip("$ ")
            m = re.search(r"-m samf\.cli\.(\w+) -- (.*)", line)
            if m and m.group(1) in modules:
                yield modules[m.group(1)], m.group(2).split()
                continue
            words = line.split()
            if words and words[0] in ("samf", "samf-train", "samf-export", "make"):
                yield words[0], words[1:]


def _make_targets() -> set:
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:", _read("Makefile"), re.M))


@pytest.mark.parametrize("page", _pages())
def test_every_command_a_code_block_shows_exists_with_its_options(page):
    groups, targets, wrong = _groups(), _make_targets(), []
    for program, args in _shown_commands(_read(page)):
        if program == "make":
            wrong += [f"make {t}" for t in args[:1] if not t.startswith("-") and "=" not in t and t not in targets]
            continue
        if not args:
            continue
        group = groups[program]
        command = group if args[0].startswith("-") else group.commands.get(args[0])
        if command is None:
            wrong.append(f"{program} {args[0]}: no such command (it has {', '.join(sorted(group.commands))})")
            continue
        options = {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for word in args:
            for option in re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", word):
                if option not in options:
                    wrong.append(f"{program} {args[0]}: no option {option}")
    assert not wrong, f"{page}: " + "; ".join(wrong)


def test_the_parsers_see_what_they_must():
    """The checks above find links, headings and commands where the pages have them (a parser that found none
    would pass everything)."""
    assert _slug("Fidelity (each one a test in `tests/test_fidelity.py`)") == \
        "fidelity-each-one-a-test-in-teststest_fidelitypy"
    assert _slug("What the demo's tiny model learned") == "what-the-demos-tiny-model-learned"
    assert "docs/training.md" in _links("README.md")
    sample = "```bash\nsamf report a.nii --bundle B \\\n    --json   # --not-an-option\nmake demo\n```\n"
    assert list(_shown_commands(sample)) == [("samf", ["report", "a.nii", "--bundle", "B", "--json"]),
                                             ("make", ["demo"])]
    shown = [p for page in _pages() for p, _ in _shown_commands(_read(page))]
    assert {"samf", "samf-train", "samf-export", "make"} <= set(shown)
