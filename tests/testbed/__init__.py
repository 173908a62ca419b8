"""Test bed: the real FHIR R4 test server (``fhir``), its synthetic data set (``data``) and friends."""
