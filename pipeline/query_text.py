"""The query command's input and output as text: a queries file (TOML or JSON lines) and the
printed top-k table."""

from __future__ import annotations

import json
from pathlib import Path


def read_queries_file(path: str) -> list[dict]:
    """[[queries]] tables of a TOML file, or one JSON object per line; image paths are
    relative to the file."""
    import tomllib

    from ctrak.errors import ConfigError

    file = Path(path)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise ConfigError(f"queries file {path} does not exist") from None
    try:
        if file.suffix == ".toml":
            items = tomllib.loads(text).get("queries", [])
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"queries file {path}: {err}") from None
    allowed = {"prompt", "concept", "negative", "image"}
    for item in items:
        if not isinstance(item, dict) or set(item) - allowed or "prompt" not in item:
            raise ConfigError(f"queries file {path}: {item!r} needs a prompt and only {allowed}")
        if item.get("image"):
            item["image"] = str(file.parent / item["image"])
    if not items:
        raise ConfigError(f"queries file {path} holds no queries")
    return items


def format_table(results) -> str:
    """One block per query: rank, score, key, shard, caption, metadata (shortened)."""
    lines = []
    for j, result in enumerate(results, 1):
        q = result.query
        label = f'query {j}: "{q.prompt}"' + (f' concept="{q.concept}"' if q.concept else "")
        lines.append(label + (f" image={q.image_path}" if q.image_path else ""))
        lines.append(
            f"{'rank':>4}  {'score':>11}  {'key':<12} {'shard':<8} {'caption':<28} metadata"
        )
        for h in result.hits:
            meta = json.dumps(h.metadata, sort_keys=True) if h.metadata is not None else "-"
            meta = meta if len(meta) <= 48 else meta[:45] + "..."
            lines.append(
                f"{h.rank:>4}  {h.score:>11.5g}  {h.key:<12} {h.shard:<8} "
                f"{h.caption[:28]:<28} {meta}"
            )
        lines.append("")
    return "\n".join(lines)
