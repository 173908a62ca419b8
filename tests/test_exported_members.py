"""The public door: `mcp_fhir` re-exports a sorted `__all__`, and every name in it exists."""

import mcp_fhir


def test_all_is_sorted_and_unique():
    names = [n for n in mcp_fhir.__all__ if n != "__version__"]
    assert names == sorted(names, key=lambda n: (n[0].islower(), n))
    assert len(set(mcp_fhir.__all__)) == len(mcp_fhir.__all__)


def test_every_exported_name_exists_and_public_classes_belong_to_the_package():
    for name in mcp_fhir.__all__:
        member = getattr(mcp_fhir, name)
        module = getattr(member, "__module__", "mcp_fhir")
        assert module.startswith("mcp_fhir"), f"{name} comes from {module}"
