"""dsaforge.eval."""
