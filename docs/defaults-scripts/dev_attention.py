"""Runs of docs/defaults-attention.md (issue 21, part C): Concept-TRAK with
`query.concept_tokens = true` and `query.concept_attention = true` (candidate A), one world
and one scope per call (`dev_candidate.run_candidate`: the queries, seeds and per-world
counts).

    python docs/defaults-scripts/dev_attention.py WORLD WORK OUT_PREFIX SCOPE [dev|reported]"""

import sys

from dev_candidate import run_candidate

run_candidate(
    "concept-trak + concept attention",
    ["query.concept_tokens=true", "query.concept_attention=true"],
    sys.argv[1:],
)
