"""Pieces the Section V experiments share, one job per module: `cli` (arguments and the run-config),
`stats` (seeds, spreads, verdicts, the paper's numbers), `progress`, `output` (CSV, tables, plots),
`report` (an experiment's section of the report) and `hfsl` (HFSL rounds and centralised training).
"""
