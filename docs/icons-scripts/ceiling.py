"""Runs of docs/ceiling-icons.md (issue 21): how high toy-icons' Concept-TRAK OOD P@10 gets
when the configuration is tuned on toy-icons itself (training side: timesteps, attributed
layers; query side: the concept's tokens / attention). Not a defaults candidate: an upper
bound of the configurations measured. One configuration per call, local scope unless told
(`dev_candidate.run_candidate`: the queries, seeds and per-world counts).

    python docs/icons-scripts/ceiling.py NAME WORK OUT_PREFIX SCOPE [dev|reported]"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "defaults-scripts"))

from dev_candidate import run_candidate

LOW = "gradient.timesteps=[99, 199, 299, 399, 499]"
HIGH = "gradient.timesteps=[599, 699, 799, 899]"
TEXT_KV = 'gradient.params=["attn2.to_k", "attn2.to_v"]'
ALL = 'gradient.params=["."]'
ATTENTION = ["query.concept_tokens=true", "query.concept_attention=true"]
GRID = {
    "low-t": [LOW],
    "low-t + attention": [LOW, *ATTENTION],
    "high-t": [HIGH],
    "high-t + attention": [HIGH, *ATTENTION],
    "text k/v": [TEXT_KV],
    "text k/v + tokens": [TEXT_KV, ATTENTION[0]],
    "all layers": [ALL],
    "all layers + attention": [ALL, *ATTENTION],
}

if __name__ == "__main__":
    name = sys.argv[1]
    run_candidate(f"concept-trak, {name}", GRID[name], ["icons", *sys.argv[2:]])
