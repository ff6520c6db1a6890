"""dsaforge.synth."""
