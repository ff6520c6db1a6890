"""dsaforge.components: one thin KFP component per stage (parse args, call one library function, track)."""
if __name__ == "components":  # imported under its bare name from a checkout's root: dsaforge/_layout.py
    from dsaforge._layout import hand_over
    hand_over(__name__, __path__[0])
