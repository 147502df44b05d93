"""What a job prints and writes when it ends: the ingest summary, results as JSON."""

from __future__ import annotations

import json
import os

from pipeline.config import PipelineConfig


def print_summary(summary, verb: str) -> None:
    """The closing summary of a featurize/reindex run, with the reject count and reasons."""
    s = summary
    print(
        f"{verb}: {s.written} shard(s) written, {s.skipped} already in the store; "
        f"{s.rows} rows featurized, {s.rejected} rejected; "
        f"{s.fisher_grams_added} Gram(s) added to the Fisher; {s.seconds:.1f} s "
        f"({s.samples_per_s:.2f} samples/s featurizing) -> {s.store}"
    )
    if s.rejected:
        top = sorted(s.reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        print(f"rejected rows by reason (all of them in {s.store}/rejects/<shard>.parquet):")
        for reason, count in top:
            print(f"  {count:>6}  {reason[:100]}")
        others = sorted(s.reasons.items(), key=lambda kv: (-kv[1], kv[0]))[5:]
        if others:
            rows = sum(count for _, count in others)
            print(
                f"  and {len(others)} more reason(s) ({rows} row(s)) in {s.store}/rejects/ "
                "(the `reason` column)"
            )
    print(f"store: {s.store_rows} rows, {s.store_rejected} rejected")
    if s.duplicate_keys:
        print(
            f"warning: {s.duplicate_keys} key(s) occur in more than one shard (each stored "
            f"under both ids): see {s.store}/reports/duplicate-keys.json"
        )


def write_json(path: str | None, body: dict) -> None:
    """Write `body` as JSON at `path` (when given), atomically: a reader (or a crash) never
    leaves half a file."""
    if not path:
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as handle:
            json.dump(body, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_ingest(config: PipelineConfig, *, create: bool, verb: str, json_path: str | None) -> int:
    """Featurize (create=True) or reindex the store of `config` on Ray; print the summary and
    write it to `json_path` (also when the reject budget is exceeded: every shard is written
    then, and the RejectBudgetError is raised after)."""
    from pipeline.cluster import ray_session
    from pipeline.errors import RejectBudgetError
    from pipeline.ingest import ingest

    with ray_session(config.ray):
        try:
            summary = ingest(config, create=create, progress=config.ray.progress)
        except RejectBudgetError as err:  # every shard is written: still report the run
            print_summary(err.summary, verb)
            write_json(json_path, err.summary.to_dict())
            raise
    print_summary(summary, verb)
    write_json(json_path, summary.to_dict())
    return 0
