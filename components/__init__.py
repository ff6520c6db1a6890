"""dsaforge.components."""
