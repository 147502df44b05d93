"""A bigger dev measurement on toy-paper, where docs/defaults-attention.md's rule failed by
0.005 (mean OOD) and 0.009 (mean ID): today's defaults and candidate A on 16 local query
images per combination (seed 5000) and, in global scope, 4 queries per held-out target (32
draws each, from seeds 5000-5003). Read after the decision; it does not change it.

    python docs/defaults-scripts/paper_attention_noise.py WORK OUT_PREFIX local|global"""

import json
import sys
from pathlib import Path

from pipeline.config_file import with_overrides
from pipeline.evaluation.synthetic_bench import evaluate, markdown_table
from pipeline.evaluation.variants import Variant, chosen_variants

work, out, scope = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
model = "ctrak/assets/toy-paper"
today = chosen_variants("methods", ["concept-trak"], [])[0]
overrides = ["query.concept_tokens=true", "query.concept_attention=true"]
share = Variant(
    "concept-trak + concept attention", with_overrides(today.config, overrides, "attribution.")
)
if scope == "local":
    extra = dict(per_combo=16)
else:
    extra = dict(combos=["a red triangle"], global_queries=4)
result = evaluate(
    model,
    [today, share],
    work=work,
    scopes=[scope],
    query_seed=5000,
    global_seed=5000,
    global_draws=32,
    **extra,
)
Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
Path(f"{out}.md").write_text(markdown_table(result) + "\n")
print(markdown_table(result))
