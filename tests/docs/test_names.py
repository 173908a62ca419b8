"""Issue #17: the docs name no command, flag, settings key, make target or file that the code does not have.

Cheap drift checks over every page the procedures runner reads (README.md, SECURITY.md, docs/*.md,
policies/README.md, examples/**/README.md): each `mcp-fhir SUB [SUBSUB] ... --flag` the docs show must
parse as a subcommand path with that option, each backticked settings key (`opa.url`,
`backends.NAME.smart.client_id`, ...) must be a key of the settings models, each `make TARGET`
must be a Makefile target, and each backticked repository path (`mcp_fhir/...`, `tests/...`,
`examples/...`) must exist, read from the repository's root or the page's folder, unless a documented
procedure creates it (`file=PATH`). The README's module map names every module of the package.
"""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

import pytest

from mcp_fhir.cli.main import parser as _build_parser
from mcp_fhir.config import Settings
from tests.docs.procedures import REPO
from tests.test_config import reference_keys

parser = functools.cache(_build_parser)
PAGES = ("README.md", "SECURITY.md", "docs/*.md", "policies/README.md", "examples/**/README*.md")
SECTIONS = tuple(Settings.model_fields)  # the config file's top-level sections
_CODE = re.compile(r"```[^\n]*\n(.*?)^```|`([^`\n]+)`", re.DOTALL | re.MULTILINE)
_COMMAND = re.compile(r"mcp-fhir((?:\s+[a-z][a-z-]*)+)([^\n|;&#]*)")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z-]*|-o)\b")
_KEY = re.compile(r"^((?:" + "|".join(SECTIONS) + r")(?:\.[A-Za-z_<>\[\]*]+)+)(?::.*|=.*)?$")
# Dotted names in these sections that are not settings keys: the decision's fields (`audit.alerts`), the
# policy's data (`config/consent`'s `consent.ai_actor_roles`, `config/tools`' `tools.matches`) and a
# test fixture's attribute (`server.fhir_base_url`).
NOT_SETTINGS = {
    "audit.alerts",
    "audit.sensitivity",
    "consent.ai_actor_roles",
    "consent.ai_processing_purposes",
    "consent.break_glass_overrides",
    "tools.matches",
    "server.fhir_base_url",
}
_FILE = re.compile(r"\.(?:rego|py|ya?ml|json|jsonl|md|db|sqlite|pem|pub|txt|html|sh)$")
_MAKE = re.compile(r"(?<![\w./-])make\s+([a-z][a-z-]*)")


def pages(root: Path = REPO) -> dict[str, str]:
    found: dict[str, str] = {}
    for pattern in PAGES:
        for path in sorted(root.glob(pattern)):
            found[str(path.relative_to(root))] = path.read_text(encoding="utf-8")
    return found


def _code(text: str) -> list[str]:
    """Every fenced block and inline code span of a page, with shell line continuations joined."""
    return [(m.group(1) or m.group(2) or "").replace("\\\n", " ") for m in _CODE.finditer(text)]


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {opt for action in p._actions for opt in action.option_strings}


def cli_problems(text: str) -> list[str]:
    """Each `mcp-fhir ...` in the code of `text` whose subcommands or flags the CLI does not have."""
    problems = []
    for code in _code(text):
        for line in code.splitlines():
            for match in _COMMAND.finditer(line):
                node = parser()
                words = match.group(1).split()
                used = []
                for word in words:
                    subs = _subparsers(node)
                    if not subs:
                        break
                    if word not in subs:
                        problems.append(f"mcp-fhir {' '.join([*used, word])}: no such subcommand")
                        node = None
                        break
                    node, used = subs[word], [*used, word]
                if node is None or not used:
                    continue
                if _subparsers(node):  # a command group named alone, as in "mcp-fhir audit"
                    continue
                known = _options(node)
                for flag in _FLAG.findall(match.group(2) + " " + " ".join(words[len(used) :])):
                    if flag not in known:
                        problems.append(f"mcp-fhir {' '.join(used)} {flag}: no such option")
    return problems


def _key_known(key: str, known: set[str]) -> bool:
    if key in NOT_SETTINGS or _FILE.search(key):
        return True
    key = re.sub(r"\.(?:\*|<[^>]*>)$", "", key)  # a wildcard or placeholder names the keys under it
    key = re.sub(r"_\*$", "_", key)  # `audit.encryption_key_*`: the keys that start so
    key = re.sub(r"^backends\.[^.]+\.", "backends.NAME.", key)
    key = re.sub(r"\[[^\]]*\]", "[]", key)
    if key.endswith("_"):
        return any(k.startswith(key) for k in known)
    return key in known or any(k.startswith(key + ".") or k.startswith(key + "[]") for k in known)


def key_problems(text: str) -> list[str]:
    """Each backticked settings key in `text` that the settings models do not have."""
    known = {k for k, _ in reference_keys()}
    problems = []
    for code in (m.group(2) for m in _CODE.finditer(text) if m.group(2)):
        match = _KEY.match(code.strip())
        if match and not _key_known(match.group(1), known):
            problems.append(f"{match.group(1)}: no such settings key")
    return problems


def make_problems(text: str) -> list[str]:
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.MULTILINE))
    return [
        f"make {t}: no such target" for code in _code(text) for t in _MAKE.findall(code) if t not in targets
    ]


_PATH = re.compile(
    r"`((?:mcp_fhir|tests|scripts|examples|policies|docs|bench|\.ci|\.github)/[A-Za-z0-9_./-]+)`"
)
_CREATED = re.compile(r"^```+[^\n]*\bfile=(\S+)", re.MULTILINE)


def path_problems(
    page: str, text: str, root: Path = REPO, created: frozenset[str] = frozenset()
) -> list[str]:
    """Each backticked repository path on `page` that does not exist and no procedure creates."""
    folder = (root / page).parent
    problems = []
    for path in _PATH.findall(text):
        path = path.split("::")[0].rstrip("/.")
        if "*" in path:
            continue
        candidates = [root / path, folder / path]
        if any(c.exists() for c in candidates):
            continue
        if any(str(c.resolve().relative_to(root.resolve())) in created for c in candidates):
            continue
        problems.append(f"{path}: no such file or folder")
    return problems


PAGE_TEXTS = pages()
CREATED = frozenset(p for text in PAGE_TEXTS.values() for p in _CREATED.findall(text))


def test_the_drift_checks_read_every_page():
    assert {"README.md", "SECURITY.md", "docs/runbook.md", "policies/README.md"} <= PAGE_TEXTS.keys()


# What a page may name, each checked against the thing itself: the CLI's parser, the settings models,
# the Makefile, and the repository's files (a path a documented procedure creates counts as existing).
DRIFT_CHECKS = {
    "commands and flags the CLI has": lambda page, text: cli_problems(text),
    "settings keys the models have": lambda page, text: key_problems(text),
    "make targets the Makefile has": lambda page, text: make_problems(text),
    "repository paths that exist": lambda page, text: path_problems(page, text, created=CREATED),
}


@pytest.mark.parametrize("check", sorted(DRIFT_CHECKS))
@pytest.mark.parametrize("page", sorted(PAGE_TEXTS))
def test_a_page_names_only_commands_keys_targets_and_paths_that_exist(page: str, check: str):
    problems = DRIFT_CHECKS[check](page, PAGE_TEXTS[page])
    assert not problems, "\n".join(problems)


def test_the_readme_module_map_names_every_module_of_the_package():
    readme = PAGE_TEXTS["README.md"]
    package = REPO / "mcp_fhir"
    missing = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.name in ("__init__.py", "_version.py") or rel.parts[0] in (
            "governance",
            "audit",
            "agent_auth",
            "cli",
        ):
            continue  # a package the map names as a whole (`mcp_fhir/audit/`), or the package's own door
        if len(rel.parts) > 2 and rel.parts[-2] == "profiles":
            continue  # `profiles/`, named as a folder
        short = "/".join(rel.parts[-2:]) if len(rel.parts) > 1 else rel.name
        if (
            f"`{rel.as_posix()}`" not in readme
            and f"`mcp_fhir/{rel.as_posix()}`" not in readme
            and f"`{short}`" not in readme
            and f"`{rel.name}`" not in readme
        ):
            missing.append(rel.as_posix())
    assert not missing, "the README's module map does not name: " + ", ".join(missing)


def test_a_page_naming_a_missing_path_is_caught():
    assert path_problems("docs/x.md", "see `mcp_fhir/tools/no_such_module.py`") != []
    assert path_problems("docs/x.md", "see `mcp_fhir/tools/callpath.py` and `tests/docs/`") == []


@pytest.mark.parametrize(
    ("text", "check"),
    [
        ("```sh\nmcp-fhir policy diff main HEAD --no-such-flag\n```", cli_problems),
        ("run `mcp-fhir audit verify --config c.yaml --publik-key k.pem`", cli_problems),
        ("```sh\nmcp-fhir policy explain --role nurse\n```", cli_problems),
        ("```sh\nmcp-fhir policy diff main \\\n    HEAD --max-char 10\n```", cli_problems),
        ("set `opa.no_such_key: true`", key_problems),
        ("set `backends.epic.smart.client_idd`", key_problems),
        ("```sh\nmake no-such-target\n```", make_problems),
    ],
)
def test_a_page_naming_a_missing_command_flag_key_or_target_is_caught(text, check):
    assert check(text) != []


@pytest.mark.parametrize(
    ("text", "check"),
    [
        ("```sh\nmcp-fhir policy diff main HEAD --full-grid --out r.md  # --not-a-flag\n```", cli_problems),
        ("`mcp-fhir audit` verifies, queries and exports", cli_problems),
        ("set `opa.url`, `backends.epic.smart.client_id` or `auth.api_keys[].scopes`", key_problems),
        ("`make demo`", make_problems),
    ],
)
def test_a_page_naming_what_exists_passes(text, check):
    assert check(text) == []
