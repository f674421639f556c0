"""The Model Zoo benchmark: model_zoo.py runs it; formulations.py (what is timed), stats.py (medians, intervals,
paired ratios) and report.py (summary, targets, Markdown) are its parts."""
