"""Security: weights load only from safetensors; tar member names never touch the filesystem;
credentials never reach logs, manifests, reports or error messages; the dev S3 server binds
loopback only and requires credentials."""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from services import free_s3_port

from ctrak.errors import ModelLoadError
from ctrak.model import DiffusionModel
from ctrak.toy.world_shards import generate_world
from jobs.cli import main
from pipeline.config import StorageConfig
from pipeline.dev.s3server import ports
from pipeline.shards import decode_shard
from pipeline.storage import filesystem, redact

ROOT = Path(__file__).resolve().parents[1]


# ---- weights -------------------------------------------------------------------------------
class _Unpickled:
    """A pickle that touches `canary` when loaded: proof that a loader ran pickle."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return (Path.touch, (self.canary,))


@pytest.mark.parametrize(
    ("component", "safetensors", "pickled"),
    [
        ("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
        ("text_encoder", "model.safetensors", "pytorch_model.bin"),
    ],
)
def test_pickle_weights_are_refused_unopened(
    component, safetensors, pickled, pixel_model_dir, tmp_path
):
    model = tmp_path / "model"
    shutil.copytree(pixel_model_dir, model)
    canary = tmp_path / "pickle-was-loaded"
    (model / component / safetensors).unlink()
    (model / component / pickled).write_bytes(pickle.dumps(_Unpickled(canary)))
    with pytest.raises(ModelLoadError, match=rf"'{component}'.*safetensors"):
        DiffusionModel.load(model)
    assert not canary.exists()


# loaders that run pickle; a file listed in KNOWN is a reported finding for its owner
UNSAFE = {
    "torch.load without weights_only=True": re.compile(
        r"torch\.load\((?![^)]*weights_only\s*=\s*True)"
    ),
    "pickle.load": re.compile(r"\b(?:c?pickle|dill|joblib)\.loads?\("),
    "np.load(allow_pickle=True)": re.compile(r"allow_pickle\s*=\s*True"),
    "tar extraction to disk": re.compile(r"\.extractall\(|\.extract\("),
}
KNOWN = {"ctrak/toy/parts.py"}  # resume checkpoint: torch.load(weights_only=False), reported


def test_no_code_path_unpickles_or_extracts():
    offenders = {}
    for folder in ("ctrak", "pipeline", "jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            found = [name for name, pattern in UNSAFE.items() if pattern.search(text)]
            if found:
                offenders[str(path.relative_to(ROOT))] = found
    assert set(offenders) <= KNOWN, offenders


# ---- tar member names ------------------------------------------------------------------------
def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), 70).save(buffer, format="PNG")
    return buffer.getvalue()


def test_hostile_tar_member_names_write_nothing(tmp_path, monkeypatch):
    """Traversal, absolute, symlink and hardlink members are read as data (or rejected),
    never written: decoding leaves the filesystem untouched."""
    tag = uuid.uuid4().hex[:8]
    outside = [
        Path("/tmp") / f"ctrak-evil-{tag}",
        tmp_path.parent / f"ctrak-evil-{tag}.txt",
        Path(f"/tmp/ctrak-evil-{tag}-link"),
    ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add(f"/tmp/ctrak-evil-{tag}/000.png", _png())  # absolute
        add(f"/tmp/ctrak-evil-{tag}/000.txt", b"absolute")
        add(f"../ctrak-evil-{tag}.png", _png())  # traversal
        add(f"../ctrak-evil-{tag}.txt", b"traversal")
        add("002.png", kind=tarfile.SYMTYPE, link="/etc/passwd")  # symlink out
        add("002.txt", b"symlink")
        add("003.png", kind=tarfile.LNKTYPE, link="/etc/shadow")  # hardlink out
        add("003.txt", b"hardlink")
        add(f"/tmp/ctrak-evil-{tag}-link", kind=tarfile.SYMTYPE, link="/etc")  # a bare link
    shard = tmp_path / "data" / "00000.tar"
    shard.parent.mkdir()
    shard.write_bytes(buffer.getvalue())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(tmp_path.rglob("*"))
    batch = {"shard": np.array(["00000"], object), "uri": np.array([str(shard)], object)}
    records = [
        (out["key"][i], out["reason"][i], out["caption"][i])
        for out in decode_shard(batch, storage=StorageConfig(), image_size=16)
        for i in range(len(out["row"]))
        if out["row"][i] >= 0
    ]
    assert sorted(tmp_path.rglob("*")) == before and not any(p.exists() for p in outside)
    by_key = {key: (reason, caption) for key, reason, caption in records}
    # names are only strings: the two path-like samples decode as data under their odd keys
    assert by_key[f"/tmp/ctrak-evil-{tag}/000"] == ("", "absolute")
    assert by_key[f"../ctrak-evil-{tag}"] == ("", "traversal")
    assert by_key["002"][0] == "member '002.png' is not a regular file"
    assert by_key["003"][0] == "member '003.png' is not a regular file"
    assert by_key[f"/tmp/ctrak-evil-{tag}-link"][0].endswith("is not a regular file")


# ---- credentials -----------------------------------------------------------------------------
KEY, SECRET = "AKIACTRAKLEAKTEST01", "s3cr3t-never-in-a-log-5d2e9a"


def test_redact_scrubs_credentials_and_url_user_info(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    filesystem(
        "s3://b/x", StorageConfig(endpoint_url="http://127.0.0.1:1", key="k-123", secret="s-456")
    )
    text = redact("env-secret-value k-123 s-456 at http://user:pw@host:9/b and s3://b/k")
    assert text == "*** *** *** at http://***@host:9/b and s3://b/k"
    assert "s-456" not in repr(StorageConfig(key="k-123", secret="s-456"))


def _scan(root: Path, needles: tuple[str, ...]) -> list[str]:
    """Files under `root` holding any of `needles`."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if any(n.encode() in data for n in needles):
                hits.append(str(path))
    return hits


@pytest.mark.slow
def test_credentials_never_reach_outputs_logs_or_errors(
    s3_servers, pixel_model_dir, ray_cluster, tmp_path, monkeypatch, capfd, caplog
):
    server = s3_servers.start("leak", key=KEY, secret=SECRET)
    for name, value in {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL_S3": server.endpoint_url,
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    storage = StorageConfig().resolved()
    data, store = f"s3://{server.bucket}/data", f"s3://{server.bucket}/store"
    generate_world(
        "paper", data, num_images=4, image_size=16, shard_size=2, seed=4,
        storage_options=storage.s3fs_options(),
    )  # fmt: skip
    common = [
        f"job.data={data}",
        f"job.store={store}",
        f"job.model={pixel_model_dir}",
        "attribution.projection.k=32",
        "attribution.gradient.timesteps=[499, 899]",
        "job.batch_size=4",
        "--no-progress",
    ]
    image = tmp_path / "q.png"
    image.write_bytes(_png())
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with caplog.at_level("DEBUG", logger="ctrak"):
        assert main(["featurize", *common, "--json", str(outputs / "featurize.json")]) == 0
        query = ["--prompt", "a red circle", "--concept", "circle", "--image", str(image)]
        assert main(["query", *common, *query, "--json", str(outputs / "hits.json")]) == 0
        fs, root = filesystem(store, storage)
        for path in fs.find(root):  # every store object, as written
            (outputs / path.replace("/", "_")).write_bytes(fs.cat_file(path))
        # refused credentials, then the endpoint gone: named errors, no secret
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + SECRET[::-1])
        assert main(["reindex", *common]) == 2
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        s3_servers.stop(server)
        assert main(["reindex", *common, "storage.retry_limit_s=1"]) == 2
    out, err = capfd.readouterr()
    assert "StorageError: listing" in err and "refused" in err
    assert f"StorageUnavailableError: object storage at {server.endpoint_url}" in err
    logged = "\n".join(r.getMessage() for r in caplog.records)
    needles = (KEY, SECRET, SECRET[::-1])
    for text in (out, err, logged):
        assert not any(n in text for n in needles)
    assert len(list(outputs.iterdir())) > 8 and _scan(outputs, needles) == []
    # the Ray workers' logs of this session (featurize actors, decode and query tasks)
    logs = Path(ray_cluster._private.worker._global_node.get_logs_dir_path())
    assert any(logs.glob("worker-*")) and _scan(logs, needles) == []


# ---- the dev S3 server -----------------------------------------------------------------------
LOOPBACK = {"127.0.0.1", "::1"}


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets process `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            if width == 8:
                host = ".".join(str(b) for b in raw[::-1])
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                host = "::1" if words == bytes(15) + b"\x01" else words.hex()
            found.add((host, int(port, 16)))
    return found


def _weed_pid(s3_port: int) -> int | None:
    """The weed process serving `s3_port` (started by this test)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mini" in cmdline and f"-s3.port={s3_port}".encode() in cmdline:
                return int(proc.name)
    return None


def test_dev_s3_server_binds_loopback_and_requires_credentials(tmp_path):
    port = free_s3_port(18833)
    key, secret = "dev-key-loopback", "dev-secret-loopback-31f"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "CTRAK_DEV_S3_PORT": str(port),
        "CTRAK_DEV_S3_DIR": str(tmp_path / "s3"),
        "CTRAK_DEV_S3_KEY": key,
        "CTRAK_DEV_S3_SECRET": secret,
    }
    server = subprocess.Popen(
        ["bash", str(ROOT / "infra/dev/s3-server.sh")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    printed = []
    try:
        deadline = time.monotonic() + 90
        while not any("S3 endpoint" in line for line in printed):
            line = server.stdout.readline()
            assert line or server.poll() is None, "".join(printed)
            printed.append(line)
            assert time.monotonic() < deadline, "".join(printed)
        pid = _weed_pid(port)
        listening = _listening(pid)
        assert (("127.0.0.1", port)) in listening
        assert {host for host, _ in listening} <= LOOPBACK, listening
        assert {p for _, p in listening} <= set(ports(port).values()), listening
        # no credentials, or wrong ones: refused; the right ones: served
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ctrak/", timeout=10)
        assert refused.value.code == 403
        endpoint = f"http://127.0.0.1:{port}"
        for options in ({"anon": True}, {"key": key, "secret": "not-" + secret}):
            fs = _s3(endpoint, **options)
            with pytest.raises(PermissionError):
                fs.ls("ctrak")
        assert _s3(endpoint, key=key, secret=secret).ls("ctrak") == []
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the script's Python stops weed on SIGTERM
        server.wait(timeout=30)
        leftover = _weed_pid(port)
        if leftover is not None:  # only if the script failed to stop it
            os.kill(leftover, signal.SIGKILL)
    assert leftover is None
    assert secret not in "".join(printed) + server.stdout.read()


def _s3(endpoint: str, **options):
    import s3fs

    return s3fs.S3FileSystem(
        skip_instance_cache=True,
        client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
        config_kwargs={"retries": {"total_max_attempts": 1}},
        **options,
    )
