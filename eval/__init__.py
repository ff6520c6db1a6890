"""dsaforge.eval."""
if __name__ == "eval":  # imported under its bare name from a checkout's root: dsaforge/_layout.py
    from dsaforge._layout import hand_over
    hand_over(__name__, __path__[0])
