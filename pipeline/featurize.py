"""The featurize stage: a Ray Data callable class running the Concept-TRAK engine.

    phi_i = P^T sum_t normalise(grad_theta L_DPS(z_i; x_t))        (docs/method.md eq. 8)

`__init__` loads the model and builds the `Attributor` once per actor, and refuses to run
when its model or settings differ from the store's (a worker with another copy of the model
would otherwise write features that mean something else). `__call__` turns a record batch
(see `pipeline/shards.py`) into feature rows: the images and per-sample gradients never leave
the actor, only phi (B, k) does. Rejected and end-of-shard records pass through untouched; a
row whose gradient is NaN/Inf or zero at a timestep (`ok` = False from the engine) becomes a
rejected record with REJECT_NUMERICS and a zero feature, so it is never stored.

Fault-injection hooks (`pipeline/faults.py`) are no-ops unless CTRAK_FAULT is set.
"""

from __future__ import annotations

import numpy as np
import torch

from ctrak.attribution import Attributor
from ctrak.config import AttributionConfig
from ctrak.model import DiffusionModel
from pipeline.faults import actor_exit, poison
from pipeline.poison import guarded
from pipeline.store import check_provenance

PASS_THROUGH = ("shard", "row", "key", "caption", "metadata", "count", "declared")
REJECT_NUMERICS = "non-finite or zero-norm gradient"


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_attributor(
    model_path: str, config: AttributionConfig, dtype: str = "float32"
) -> Attributor:
    """The engine on this worker's device (cuda when Ray gave it a GPU, else cpu), the model
    in `dtype` (job.model_dtype; the provenance records it)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = DiffusionModel.load(model_path, device=device, dtype=MODEL_DTYPES[dtype])
    return Attributor(model, config)


def describe_model(model_path: str, config: AttributionConfig, dtype: str = "float32") -> dict:
    """{"provenance": what the features depend on, "image_size": S} (run as a Ray task)."""
    attributor = load_attributor(model_path, config, dtype)
    return {"provenance": attributor.provenance(), "image_size": attributor.model.image_size}


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S) in [-1, 1] (pixel / 127.5 - 1)."""
    pixels = torch.from_numpy(np.array(images, dtype=np.uint8))  # a writable copy
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1


class Featurizer:
    """map_batches(Featurizer, fn_constructor_kwargs=..., compute=ActorPoolStrategy(size=N))."""

    def __init__(
        self,
        model_path: str,
        config: AttributionConfig,
        expected: dict,
        deaths=None,
        max_deaths: int = 3,
        dtype: str = "float32",
        batch_size: int | None = None,
    ) -> None:
        self.attributor = load_attributor(model_path, config, dtype)
        self.batch_size = batch_size  # job.batch_size: rows per engine call (None: the block)
        check_provenance(expected, self.attributor.provenance(), where=f"model {model_path}")
        self.deaths, self.max_deaths = deaths, max_deaths  # pipeline/poison.py

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """records (B,) -> {shard, row, key, caption, metadata, count, reason (B,),
        feature (B, k) float32}; feature rows of rejected records are zero. With a death
        registry, a row that keeps killing the actor ends rejected (pipeline/poison.py)."""
        if self.deaths is None:
            return self.featurize(batch)
        return guarded(batch, self.featurize, self.deaths, self.max_deaths)

    def featurize(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`__call__` without the death registry."""
        actor_exit(batch)  # fault injection (tests); no-op unset
        k = self.attributor.config.projection.k
        reason = np.array(batch["reason"], dtype=object)
        good = np.flatnonzero((batch["row"] >= 0) & (reason == ""))  # (G,)
        feature = np.zeros((len(reason), k), np.float32)  # (B, k)
        if len(good):
            for rows in self._engine_batches(batch, good):
                images = images_to_tensor(batch["image"][rows])  # (b, 3, S, S)
                images = poison(batch["key"][rows], images)
                captions = [str(c) for c in batch["caption"][rows]]
                phi, ok = self.attributor.featurize_batch(images, captions)  # (b, k), (b,)
                feature[rows] = phi.detach().cpu().numpy()
                reason[rows[~ok.cpu().numpy()]] = REJECT_NUMERICS
        return {
            **{name: batch[name] for name in PASS_THROUGH if name in batch},
            "reason": reason,
            "feature": feature,
        }

    def _engine_batches(self, batch: dict[str, np.ndarray], good: np.ndarray) -> list[np.ndarray]:
        """The rows `good` (G,) split into engine calls by (shard, row // batch_size): which
        rows share a call is fixed by the data, never by how Ray Data bundled its blocks (its
        output buffer merges a decode task's yields into blocks by bytes), so batched float32
        rounding - and so the stored features - do not depend on timing, and no call exceeds
        job.batch_size rows (device memory)."""
        if self.batch_size is None:
            return [good] if len(good) else []
        groups: dict[tuple[str, int], list[int]] = {}
        for i in good:
            groups.setdefault(
                (str(batch["shard"][i]), int(batch["row"][i]) // self.batch_size), []
            ).append(i)
        return [np.array(rows) for rows in groups.values()]
