"""The dev-query runs of docs/defaults-tokens.md (issue 21, part C): Concept-TRAK at today's
defaults and with `query.concept_tokens = true`, on the dev queries (local query seed 5000,
global draws from seed 5000), one world per call. Both variants share one featurize (the option
is query-only, so the feature cache key is the same).

    python docs/defaults-scripts/dev_tokens.py WORLD WORK OUT_PREFIX

WORLD: paper (8 local query images per combination, 4 combinations in global scope), wide (4
per combination; global scope on its 4 held-out combinations only), icons (4 per combination,
all 9 in global scope)."""

import json
import sys
from pathlib import Path

from pipeline.config_file import with_overrides
from pipeline.evaluation.synthetic_bench import evaluate, markdown_table
from pipeline.evaluation.variants import Variant, chosen_variants

world, work, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
model = f"ctrak/assets/toy-{world}"
today = chosen_variants("methods", ["concept-trak"], [])[0]
tokens = Variant(
    "concept-trak + concept tokens",
    with_overrides(today.config, ["query.concept_tokens=true"], "attribution."),
)
per_combo = {"paper": 8, "wide": 4, "icons": 4}[world]
common = dict(work=work, query_seed=5000, global_seed=5000, global_draws=32)
results = [evaluate(model, [today, tokens], per_combo=per_combo, scopes=["local"], **common)]
held = None
if world == "wide":
    spec = json.loads((Path(model) / "data_spec.json").read_text())
    from ctrak.toy.worlds import world_combos

    held = [c.caption for c in world_combos(spec["world"]) if c.heldout]
results.append(evaluate(model, [today, tokens], scopes=["global"], combos=held, **common))
merged = {**results[0], "records": results[0]["records"] + results[1]["records"]}
merged["global_combos"] = held
Path(f"{out}.json").write_text(json.dumps(merged, indent=2) + "\n")
Path(f"{out}.md").write_text(markdown_table(merged) + "\n")
print(markdown_table(merged))
