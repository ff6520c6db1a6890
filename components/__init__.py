"""dsaforge.components: one thin KFP component per stage (parse args, call one library function, track)."""
