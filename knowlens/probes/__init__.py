"""knowlens.probes: filled in by later issues (see DESIGN.md)."""
