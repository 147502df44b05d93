"""Runs of docs/defaults-rest.md (issue 21, part C): Concept-TRAK with
`query.partial_rest = true` (candidate P), one world and one scope per call
(`dev_candidate.run_candidate`: the queries, seeds and per-world counts).

    python docs/defaults-scripts/dev_rest.py WORLD WORK OUT_PREFIX SCOPE [dev|reported]"""

import sys

from dev_candidate import run_candidate

run_candidate("concept-trak + partial rest", ["query.partial_rest=true"], sys.argv[1:])
