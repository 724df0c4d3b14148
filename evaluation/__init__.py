"""`asif eval`: zero-shot evaluation on labelled image folders, with sweeps, plots and a baseline."""
