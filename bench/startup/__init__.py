"""HelloBench-style container startup benchmark (issue 6): OCI full pull against lazy pulling.

Run it with ``make bench`` (quick grid) or ``python bench/startup/run.py --help``; the pieces:
`images` (offline-built images pushed to a local registry), `shaping` (tc HTB bandwidth limit on
the registry proxy's port), `harness` (one clean sample: pull / create / run / ready), `report`
(percentiles, physical limit, markdown table, charts).
"""
