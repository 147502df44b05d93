"""Runs of docs/defaults-rest.md (issue 21, part C): Concept-TRAK with
`query.partial_rest = true` (candidate P), one world
and one scope per call, on the dev queries (local query seed 5000, global draws from seed
5000, as docs/defaults-scripts/dev_tokens.py) or the reported ones (the README's: local seed
1000, global draws from seed 0). The training features are the defaults' (P is query-only,
so the feature cache is shared with the other runs on the same WORK).

    python docs/defaults-scripts/dev_rest.py WORLD WORK OUT_PREFIX SCOPE [dev|reported]

WORLD: paper (8 local query images per combination), wide (dev: 4, global scope on its
held-out combinations only; reported: 2, as the README), icons (4)."""

import json
import sys
from pathlib import Path

from pipeline.config_file import with_overrides
from pipeline.evaluation.synthetic_bench import evaluate, markdown_table
from pipeline.evaluation.variants import Variant, chosen_variants

world, work, out, scope = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
queries = sys.argv[5] if len(sys.argv) > 5 else "dev"
model = f"ctrak/assets/toy-{world}"
today = chosen_variants("methods", ["concept-trak"], [])[0]
overrides = ["query.partial_rest=true"]
share = Variant(
    "concept-trak + partial rest",
    with_overrides(today.config, overrides, "attribution."),
)
per_combo = {"paper": 8, "wide": 4 if queries == "dev" else 2, "icons": 4}[world]
seeds = dict(query_seed=5000, global_seed=5000) if queries == "dev" else {}
held = None
if world == "wide" and scope == "global" and queries == "dev":
    spec = json.loads((Path(model) / "data_spec.json").read_text())
    from ctrak.toy.worlds import world_combos

    held = [c.caption for c in world_combos(spec["world"]) if c.heldout]
result = evaluate(
    model,
    [share],
    work=work,
    per_combo=per_combo,
    scopes=[scope],
    combos=held,
    global_draws=32,
    **seeds,
)
result["global_combos"] = held
Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
Path(f"{out}.md").write_text(markdown_table(result) + "\n")
print(markdown_table(result))
