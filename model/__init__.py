"""dsaforge.model."""
