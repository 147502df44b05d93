"""Featurize and reindex: stream the shards a store lacks through Ray Data into the store.

    pending shard URIs --from_items--> decode (CPU task per shard, pipeline/shards.py)
        --map_batches--> Featurizer (fixed actor pool, GPU each when the cluster has GPUs)
        --iter_batches--> driver: when all records of a shard have arrived, write its features,
        partial Gram, rejects and marker (pipeline/store.py); then refresh the Fisher

Only k-dim feature rows reach the driver. A shard is written as soon as it is complete, so a
crash loses at most the shards in flight, and a rerun featurizes only shards without a
marker: a rerun of a finished job does no featurization and rewrites no file.

Faults: a featurize actor that dies (node lost, OOM, crash) is restarted and its batch retried:
Ray Data 2.60 creates pool actors with max_restarts=-1 and max_task_retries=-1 (other values
only go through the deprecated `ray_remote_args`). Records arrive keyed by (shard, row), so a
batch delivered twice counts once. Bad rows (and unreadable or truncated tars) are rejected
records, written to the shard's rejects table; the error budget (job.max_reject_fraction of
the store's rows) is checked once every shard is written, so a bad shard never stops the good
ones and a rerun reaches the same verdict.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np

from pipeline.cluster import cluster_has_gpus, named_errors, progress_bars, remote_call
from pipeline.config import PipelineConfig, StorageConfig
from pipeline.errors import RejectBudgetError, StoreWriteError
from pipeline.faults import actor_env, driver_kill
from pipeline.featurize import Featurizer, describe_model
from pipeline.fisher import update_fisher
from pipeline.guards import check_writable, explain_write_error, shard_bytes
from pipeline.integrity import check_count, report_duplicates
from pipeline.lease import hold_lease
from pipeline.poison import start_registry
from pipeline.shards import DECODE, ShardRef, decode_shard, list_shards
from pipeline.store import FeatureStore, check_settings

log = logging.getLogger("ctrak.ingest")
DECODE_MEMORY = 768 << 20  # per decode task: a streamed tar, one batch, the worker (~600 MB)


@dataclass
class IngestSummary:
    store: str
    shards: int = 0  # in the data URI
    skipped: int = 0  # already finished in the store
    written: int = 0  # featurized and written by this run
    rows: int = 0  # featurized rows written by this run
    rejected: int = 0  # rejected rows recorded by this run (see <store>/rejects/)
    reasons: dict[str, int] = field(default_factory=dict)  # reject reason -> rows, this run
    store_rows: int = 0  # featurized rows in the store after this run
    store_rejected: int = 0  # rejected rows in the store after this run
    fisher_grams_added: int = 0
    duplicate_keys: int = 0  # keys in more than one shard (<store>/reports/duplicate-keys.json)
    seconds: float = 0.0  # whole job
    featurize_seconds: float = 0.0  # from the first shard read to the last shard written

    @property
    def samples_per_s(self) -> float:
        return self.rows / self.featurize_seconds if self.featurize_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "samples_per_s": round(self.samples_per_s, 3)}


class Record(NamedTuple):
    """One streamed sample record of a shard; reason "" = featurized, else rejected."""

    row: int
    key: str
    caption: str
    metadata: str
    reason: str
    feature: np.ndarray  # (k,) float32, zeros when rejected


class ShardAssembler:
    """Collects the streamed records of each shard until all of them (count + end) arrived.
    Records are keyed by row, so a record delivered twice (a retried task) counts once."""

    def __init__(self) -> None:
        self.records: dict[str, dict[int, Record]] = {}
        self.counts: dict[str, int] = {}  # shard -> its number of sample records
        self.declared: dict[str, int] = {}  # shard -> the count its manifest declares

    def add(self, batch: dict[str, np.ndarray]) -> list[tuple[str, list[Record]]]:
        """Add a batch; return [(shard, records sorted by row)] of the completed shards."""
        touched = set()
        for i, shard in enumerate(batch["shard"]):
            row = int(batch["row"][i])
            touched.add(shard)
            if row < 0:  # the end record
                self.counts[shard] = int(batch["count"][i])
                if "declared" in batch:
                    self.declared[shard] = int(batch["declared"][i])
                continue
            self.records.setdefault(shard, {})[row] = Record(
                row,
                *(str(batch[name][i]) for name in ("key", "caption", "metadata", "reason")),
                batch["feature"][i],
            )
        done = []
        for shard in sorted(touched):
            got = self.records.get(shard, {})
            if shard in self.counts and len(got) == self.counts[shard]:
                count = self.counts.pop(shard)
                records = [got[r] for r in sorted(got)]
                declared = self.declared.pop(shard, -1)
                done.append((shard, check_count(shard, records, count, declared, Record)))
                self.records.pop(shard, None)
        return done


def split_records(records: list[Record], k: int) -> tuple[dict, np.ndarray, list[dict]]:
    """Sorted records -> (columns of the featurized rows, features (n, k) float32, rejects)."""
    good = [r for r in records if not r.reason]
    columns = {
        name: [getattr(r, name) for r in good] for name in ("row", "key", "caption", "metadata")
    }
    features = np.stack([r.feature for r in good]) if good else np.zeros((0, k))  # (n, k)
    rejects = [{"row": r.row, "key": r.key, "reason": r.reason} for r in records if r.reason]
    return columns, features.astype(np.float32), rejects


def build_dataset(
    pending: list[ShardRef], config: PipelineConfig, storage: StorageConfig, described: dict
):
    """The lazy Ray dataset: shard items -> decoded records -> feature records."""
    import ray

    job = config.job
    items = [{"shard": s.id, "uri": s.uri, "manifest": s.manifest} for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one task per shard
    ds = ds.map_batches(
        decode_shard,
        batch_size=1,
        fn_kwargs={
            "storage": storage,
            "image_size": described["image_size"],
            "max_caption_bytes": job.max_caption_bytes,
            "rows_per_batch": job.batch_size,  # one decoded block = one featurize batch
        },
        num_cpus=1,
        # a memory reservation unlike the actor stage's: Ray fuses map stages only when
        # their resources agree, so this keeps decoding out of the (GPU) actors
        memory=DECODE_MEMORY,
    )
    resources = {"num_gpus": 1} if cluster_has_gpus() else {"num_cpus": 1}
    # batch_size=None: the actor takes whole blocks (Ray's output buffer merges a decode
    # task's yields into blocks by bytes) and splits them itself into engine calls of
    # job.batch_size rows of one shard (Featurizer._engine_batches): which rows share a call
    # is fixed by the data unless Ray cuts a group over two blocks (float32 rounding differs
    # by batch, ~5e-6; docs/faults.md)
    return ds.map_batches(
        Featurizer,
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=job.actors),
        fn_constructor_kwargs={
            "model_path": job.model,
            "config": config.attribution,
            "expected": described["provenance"],
            "deaths": start_registry(),  # bounds a poison row's retries (pipeline/poison.py)
            "max_deaths": job.max_worker_deaths,
            "dtype": job.model_dtype,
            "batch_size": job.batch_size,
        },
        **resources,
        **actor_env(),
    )


def check_budget(summary: IngestSummary, budget: float) -> None:
    """RejectBudgetError when more than `budget` of the store's rows are rejected."""
    rejected, seen = summary.store_rejected, summary.store_rows + summary.store_rejected
    if seen and rejected / seen > budget:
        top = sorted(summary.reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        err = RejectBudgetError(
            f"{rejected} of {seen} rows of {summary.store} are rejected ({rejected / seen:.1%}) "
            f"> job.max_reject_fraction={budget}; every shard is written and its rejects are "
            f"in {summary.store}/rejects/ (this run's top reasons: {top}). Fix the data (or the "
            "model's image size) and delete those shards' done-markers, or raise "
            "job.max_reject_fraction"
        )
        err.summary = summary  # the job still prints and saves it
        raise err


def ingest(config: PipelineConfig, *, create: bool, progress: bool = True) -> IngestSummary:
    """Featurize the shards of job.data that job.store lacks, then refresh the Fisher.
    create=False (reindex) requires the store to exist. Runs inside `ray_session`."""
    job = config.job
    job.require("data", "store", "model")
    storage = config.storage.resolved()
    start = time.perf_counter()
    summary = IngestSummary(store=job.store)
    store = FeatureStore(job.store, storage)
    if not create or store.exists():  # refuse another store before any model is loaded
        settings = {**config.attribution.provenance(), "model_dtype": job.model_dtype}
        check_settings(store.metadata()["provenance"], settings)
    check_writable(store)  # a read-only store fails here, before any work
    # 0. one writer at a time: the lease (pipeline/lease.py), renewed while the job runs
    verb = "featurize" if create else "reindex"
    with hold_lease(store, verb, job.lease_ttl_s, job.lease_wait_s) as lease:
        # 1. the shards of the data URI
        shards = {s.id: s for s in list_shards(job.data, storage)}
        # 2. what this model and these settings make; refuse a store made otherwise
        described = remote_call(describe_model, job.model, config.attribution, job.model_dtype)
        store.open(described["provenance"], job.feature_dtype, create=create, decode=DECODE)
        # 3. the shards without a done-marker in the store
        entries = store.entries()  # {id: ShardEntry} of the finished shards
        pending = [s for s in shards.values() if s.id not in entries]
        summary.shards, summary.skipped = len(shards), len(shards) - len(pending)
        log.info(
            "featurize: %d shard(s), %d already in %s, %d to do",
            len(shards),
            summary.skipped,
            job.store,
            len(pending),
        )
        # 4. stream them through decode -> featurize; write each shard as soon as it is complete
        if pending:
            from tqdm import tqdm

            k = config.attribution.projection.k
            assembler = ShardAssembler()
            bars = progress_bars(progress)
            bar = tqdm(total=len(pending), unit="shard", desc="shards written", disable=not bars)
            t0 = time.perf_counter()
            ds = build_dataset(pending, config, storage, described)
            with named_errors():
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    for shard, records in assembler.add(batch):
                        columns, features, rejects = split_records(records, k)
                        lease.check()  # a writer that lost its lease stops writing
                        try:
                            entries[shard] = store.write_shard(
                                shards[shard], columns, features, rejects, job.feature_dtype
                            )
                        except StoreWriteError as err:  # a full disk: say what the job needs
                            sizes = [shard_bytes(e) for e in entries.values()] or [err.size]
                            left = len(pending) - summary.written
                            per_shard = sum(sizes) // len(sizes)
                            explained = explain_write_error(
                                err, remaining=left, per_shard=per_shard, k=k
                            )
                            raise explained from None
                        summary.written += 1
                        summary.rows += len(features)
                        summary.rejected += len(rejects)
                        for r in rejects:
                            summary.reasons[r["reason"]] = summary.reasons.get(r["reason"], 0) + 1
                        if rejects:
                            log.warning("shard %s: %d row(s) rejected", shard, len(rejects))
                        if progress and not bars:  # a line per shard where bars cannot draw
                            log.info(
                                "shard %s written (%d/%d): %d rows, %d rejected",
                                shard,
                                summary.written,
                                len(pending),
                                len(features),
                                len(rejects),
                            )
                        bar.update(1)
                        bar.set_postfix(rows=summary.rows, rejected=summary.rejected)
                        driver_kill(summary.written)  # fault injection (tests); no-op unset
            bar.close()
            summary.featurize_seconds = time.perf_counter() - t0
        # 5. keys stored in more than one shard: reported, not stored silently under two ids
        if summary.written:
            summary.duplicate_keys = report_duplicates(store, entries)["keys"]
        # 6. add the new shards' partial Grams and refactorise
        lease.check()
        _, summary.fisher_grams_added = update_fisher(
            store, config.attribution.damping_ratio, entries
        )
        summary.store_rows = sum(e.rows for e in entries.values())
        summary.store_rejected = sum(e.rejects for e in entries.values())
        summary.seconds = time.perf_counter() - start
    # 7. the error budget, over the whole store (the same verdict on a rerun)
    check_budget(summary, job.max_reject_fraction)
    return summary
