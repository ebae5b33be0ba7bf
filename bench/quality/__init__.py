"""``python -m bench.quality``: score every model's spoken answers (issue #18).

runner.py drives the questions through ``respond`` (and a duplex model's scripted conversation,
duplex.py); asr.py transcribes the replies; mos.py estimates their audio quality; scoring.py turns
texts into numbers; report.py writes the table, the JSON/Markdown report and the plot.
"""
