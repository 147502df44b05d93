"""Named errors of the distributed pipeline. Each says what is wrong and how to fix it.

They subclass `ctrak.errors.CtrakError`, so the `ctrak` command reports them as one line
(`error: ProvenanceMismatchError: ...`) with exit code 2. No message ever holds a credential.
"""

from __future__ import annotations

from ctrak.errors import ConfigError, CtrakError


class StorageError(CtrakError):
    """A data or store URI cannot be listed, read or written (missing, forbidden, bad name)."""


class MissingFileError(StorageError):
    """A file or object that should exist does not."""


class NoShardsError(StorageError):
    """The data URI holds no WebDataset `.tar` shards."""


class StoreNotFoundError(StorageError):
    """The feature store (its store.json) does not exist where a job expects one."""


class StoreCorruptError(StorageError):
    """A stored file does not match the checksum its done-marker recorded."""


class ProvenanceMismatchError(CtrakError):
    """The store (or a worker's model) was made with other settings than this job's."""


class StaleFisherError(CtrakError):
    """The stored Fisher does not cover exactly the store's finished shards."""


class RejectBudgetError(CtrakError):
    """More rows were rejected (undecodable, wrong size, ...) than the job's error budget."""


class StorageUnavailableError(StorageError):
    """Object storage kept failing (refused, reset, timed out, 5xx) past storage.retry_limit_s;
    the message names the endpoint, never the credentials."""


class UnknownConfigKeyError(ConfigError):
    """A config file or override names a key that no configuration dataclass has."""


class StoreNotWritableError(StorageError):
    """The store cannot be written (read-only file system, no permission): found before any
    work by a probe write; the message names the path."""


class StoreWriteError(StorageError):
    """A write to the store failed (no space left, quota, I/O error); the message names the
    path and, for a full disk, how much space the job still needs. Finished shards are kept."""

    def __init__(self, message: str, path: str = "", errno: int = 0, size: int = 0) -> None:
        super().__init__(message)
        self.path, self.errno, self.size = path, errno, size


class StoreLockedError(StorageError):
    """Another writer (featurize/reindex) holds the store's lease; the message names it."""


class IndexNotFoundError(CtrakError):
    """A query asked for the vector index of a store that has none (index/index.json)."""


class StaleIndexError(CtrakError):
    """The store's vector index does not cover exactly its finished feature files (one added,
    replaced or removed since indexing) or was built under other store settings."""
