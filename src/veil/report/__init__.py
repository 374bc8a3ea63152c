"""`veil report` and the frontier: results read back and laid out for a reader.

    sections.py   report(): runs, sweeps and matrices -> report.html + report.md, one function per section
    frontier.py   a sweep's utility-privacy frontier: rows, dominance, table, plot, frontier.csv/png
    page.py       the page model and its HTML / Markdown rendering

It imports the attack's results vocabulary (veil.attack.results), the training core and the leaves
(plots, io, metrics), never the sweep.
"""

from veil.report.sections import report

__all__ = ["report"]
