"""The one run of a query-side defaults candidate (docs/defaults-attention.md,
docs/defaults-rest.md): Concept-TRAK at the defaults plus `overrides`, one world and one scope,
on the dev queries (local query seed 5000, global draws from seed 5000, as
docs/defaults-scripts/dev_tokens.py) or the reported ones (the README's: local seed 1000,
global draws from seed 0). The training features are the defaults' (the candidates are
query-only, so the feature cache is shared with the other runs on the same WORK).

WORLD: paper (8 local query images per combination), wide (dev: 4, global scope on its
held-out combinations only; reported: 2, as the README), icons (4)."""

import json
from pathlib import Path

from pipeline.config_file import with_overrides
from pipeline.evaluation.synthetic_bench import evaluate, markdown_table
from pipeline.evaluation.variants import Variant, chosen_variants


def run_candidate(name: str, overrides: list[str], argv: list[str]) -> None:
    """argv: WORLD WORK OUT_PREFIX SCOPE [dev|reported]; writes OUT_PREFIX.json / .md."""
    world, work, out, scope = argv[0], Path(argv[1]), argv[2], argv[3]
    queries = argv[4] if len(argv) > 4 else "dev"
    model = f"ctrak/assets/toy-{world}"
    today = chosen_variants("methods", ["concept-trak"], [])[0]
    candidate = Variant(name, with_overrides(today.config, overrides, "attribution."))
    per_combo = {"paper": 8, "wide": 4 if queries == "dev" else 2, "icons": 4}[world]
    seeds = dict(query_seed=5000, global_seed=5000) if queries == "dev" else {}
    held = None
    if world == "wide" and scope == "global" and queries == "dev":
        spec = json.loads((Path(model) / "data_spec.json").read_text())
        from ctrak.toy.worlds import world_combos

        held = [c.caption for c in world_combos(spec["world"]) if c.heldout]
    result = evaluate(
        model,
        [candidate],
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
