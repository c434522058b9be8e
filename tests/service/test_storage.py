"""The artifact store: every backend passes the same tests (local directory; S3 against a real S3 server).

The S3 backend runs against ``s3_server``: moto's standalone S3-compatible server over HTTP, a
subprocess (no in-process mocking). The last test runs a whole job on a stack that uses it.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import pytest

from service.storage import LocalStore, StoreError, make_store
from service.storage.s3 import MARKER, S3Store

BLOB = bytes(range(256)) * 12  # 3072 bytes


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_server").store(work_root=tmp_path / "work")


def _folder(store, job: str = "job1") -> Path:
    src = store.work_dir() / job / "out"
    (src / "model").mkdir(parents=True)
    (src / "model" / "a.bin").write_bytes(b"abc" * 1000)
    (src / "SHA256SUMS").write_text("x\n")
    return src


def _interrupt_publish(store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the publish's last step fail: the rename (local) or the completion marker's upload (S3)."""
    if isinstance(store, S3Store):
        put = store.client.put_object

        def no_marker(**kw):
            if kw["Key"].endswith("/" + MARKER):
                raise ConnectionError("host died before the marker")
            return put(**kw)

        monkeypatch.setattr(store.client, "put_object", no_marker)
    else:
        def no_rename(*a):
            raise OSError("host died before the rename")

        monkeypatch.setattr("service.storage.os.rename", no_rename)


def test_store_publishes_a_folder_whole(store) -> None:
    src = _folder(store)
    assert not store.exists("jobs/job1/SHA256SUMS") and list(store.list("jobs/job1")) == []
    files = store.publish("jobs/job1", src)
    assert not src.exists()
    assert [(f.name, f.bytes) for f in files] == [("SHA256SUMS", 2), ("model/a.bin", 3000)]
    assert files[1].sha256 == hashlib.sha256(b"abc" * 1000).hexdigest() and files[1].key == "jobs/job1/model/a.bin"
    assert list(store.list("jobs/job1")) == files
    for f in files:
        assert store.exists(f.key) and store.size(f.key) == f.bytes
    with store.open("jobs/job1/model/a.bin") as f:
        assert f.read() == b"abc" * 1000
    assert not store.exists("jobs/job1/model") and not store.exists("jobs/job1/" + MARKER)
    with pytest.raises(StoreError, match="already published"):
        store.publish("jobs/job1", _folder(store, "again"))
    store.delete_prefix("jobs/job1")
    assert not store.exists("jobs/job1/model/a.bin")
    with pytest.raises(StoreError, match="not a folder"):
        store.publish("jobs/job1", src)  # moved away (local) or uploaded and removed (S3)
    assert list(store.list("jobs/job1")) == []


def test_half_published_prefix_is_invisible(store, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _folder(store)
    with monkeypatch.context() as m:
        _interrupt_publish(store, m)
        with pytest.raises((OSError, ConnectionError)):
            store.publish("jobs/job1", src)
    if isinstance(store, S3Store):  # the files did reach the bucket; only the marker is missing
        raw = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix + "jobs/job1/")
        assert sorted(o["Key"].removeprefix(store.prefix) for o in raw["Contents"]) == [
            "jobs/job1/SHA256SUMS", "jobs/job1/model/a.bin"]
    assert list(store.list("jobs/job1")) == []
    for key in ("jobs/job1/SHA256SUMS", "jobs/job1/model/a.bin"):
        assert not store.exists(key)
        for read in (store.size, store.open, store.iter_bytes):
            with pytest.raises(StoreError, match="not in the store"):
                read(key)
    # Not "already published": the next attempt publishes it, whole.
    files = store.publish("jobs/job1", src)
    assert [f.name for f in files] == ["SHA256SUMS", "model/a.bin"] and store.exists("jobs/job1/model/a.bin")


def test_delete_prefix_removes_only_that_prefix(store) -> None:
    store.publish("jobs/job1", _folder(store, "1"))
    store.publish("jobs/job10", _folder(store, "10"))
    store.put_bytes("texts/t.txt", b"hello")
    store.delete_prefix("jobs/job1")
    assert not store.exists("jobs/job1/SHA256SUMS") and list(store.list("jobs/job1")) == []
    assert store.exists("jobs/job10/model/a.bin") and len(list(store.list("jobs/job10"))) == 2
    assert store.exists("texts/t.txt")
    store.delete_prefix("jobs/job1")  # deleting again (or a prefix never published) is fine
    store.delete_prefix("jobs/never")
    assert len(store.publish("jobs/job1", _folder(store, "1b"))) == 2  # publishable again


@pytest.mark.parametrize("key", ["../outside", "/etc/passwd", "jobs/../../x", ""])
def test_store_refuses_keys_outside_its_root(store, key: str) -> None:
    for call in (lambda: store.put_bytes(key, b"x"), lambda: store.exists(key), lambda: store.open(key),
                 lambda: store.size(key), lambda: store.iter_bytes(key), lambda: store.delete_prefix(key),
                 lambda: list(store.list(key))):
        with pytest.raises(StoreError, match="outside the store"):
            call()


def test_put_bytes_exists_size_open(store) -> None:
    assert not store.exists("texts/a.txt")
    for read in (store.size, store.open, store.iter_bytes):
        with pytest.raises(StoreError, match="not in the store"):
            read("texts/a.txt")
    store.put_bytes("texts/a.txt", b"first")
    store.put_bytes("texts/a.txt", BLOB)  # replaced whole
    assert store.exists("texts/a.txt") and store.size("texts/a.txt") == len(BLOB)
    with store.open("texts/a.txt") as f:
        assert f.read() == BLOB
    assert not store.exists("texts")
    path = store.local_path("texts/a.txt")
    assert (path is None) if isinstance(store, S3Store) else path.read_bytes() == BLOB


@pytest.mark.parametrize("published", [False, True])
def test_ranged_reads(store, published: bool) -> None:
    if published:
        src = store.work_dir() / "r" / "out"
        src.mkdir(parents=True)
        (src / "blob.bin").write_bytes(BLOB)
        store.publish("jobs/r", src)
        key = "jobs/r/blob.bin"
    else:
        key = "texts/blob.txt"
        store.put_bytes(key, BLOB)
    n = len(BLOB)

    def read(*a: int | None, **kw: int) -> bytes:
        return b"".join(store.iter_bytes(key, *a, **kw))

    assert read() == BLOB and read(0, None) == BLOB
    assert read(100, 1100) == BLOB[100:1100]
    assert read(n - 3) == BLOB[-3:] and read(n - 1, n) == BLOB[-1:]
    assert read(5, 5) == b"" and read(n, n) == b""
    assert read(0, n, chunk_size=1000) == BLOB
    assert [len(c) for c in store.iter_bytes(key, 0, 2500, chunk_size=1000)][:2] == [1000, 1000]
    for bad in ((0, n + 1), (10, 5), (-1, 4), (n + 1, None)):
        with pytest.raises(StoreError, match="outside"):
            read(*bad)


# The S3 backend's own parts.

def test_s3_objects_live_under_the_prefix_with_a_marker_written_last(s3_server, tmp_path: Path) -> None:
    prefix = f"svc-{uuid.uuid4().hex[:8]}/"
    store = s3_server.store(prefix=prefix, work_root=tmp_path)
    files = store.publish("jobs/j", _folder(store))
    store.put_bytes("texts/t.txt", b"t")
    raw = s3_server.client()
    objs = raw.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)["Contents"]
    assert sorted(o["Key"] for o in objs) == [prefix + k for k in
                                             ("jobs/j/.complete", "jobs/j/SHA256SUMS", "jobs/j/model/a.bin",
                                              "texts/t.txt")]
    marker = json.loads(raw.get_object(Bucket=s3_server.bucket, Key=prefix + "jobs/j/.complete")["Body"].read())
    assert marker["files"] == [{"name": f.name, "bytes": f.bytes, "sha256": f.sha256} for f in files]
    by_key = {o["Key"]: o["LastModified"] for o in objs}
    assert by_key[prefix + "jobs/j/.complete"] >= max(by_key[prefix + "jobs/j/" + f.name] for f in files)
    other = s3_server.store(work_root=tmp_path)  # another prefix in the same bucket sees none of it
    assert not other.exists("texts/t.txt") and list(other.list("jobs/j")) == []
    # An object that its marker does not list (left by an earlier attempt) stays invisible.
    raw.put_object(Bucket=s3_server.bucket, Key=prefix + "jobs/j/stale.bin", Body=b"old",
                   Metadata={"spinquant-prefix": "jobs/j"})
    assert not store.exists("jobs/j/stale.bin")
    store.delete_prefix("jobs/j")
    assert [o["Key"] for o in raw.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)["Contents"]] == [
        prefix + "texts/t.txt"]


def test_s3_racing_publishers_one_wins(s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both saw no marker; the marker's conditional write (If-None-Match: *) refuses the second."""
    store = s3_server.store(work_root=tmp_path)
    store.publish("jobs/j", _folder(store))
    monkeypatch.setattr(store, "_marker", lambda prefix: None)
    with pytest.raises(StoreError, match="already published"):
        store.publish("jobs/j", _folder(store, "second"))


def test_make_store_picks_the_backend(s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from service.settings import ApiSettings, WorkerSettings

    for cls in (ApiSettings, WorkerSettings):
        local = make_store(cls(artifact_root=tmp_path / "a"))
        assert isinstance(local, LocalStore) and local.work_dir() == (tmp_path / "a" / ".work").resolve()
        assert make_store(cls(artifact_root=tmp_path / "a", work_root=tmp_path / "w")).work_dir() == \
            (tmp_path / "w").resolve()
        with pytest.raises(ValidationError, match="SPINQUANT_S3_BUCKET"):
            cls(store="s3")
        with pytest.raises(ValidationError, match="or neither"):
            cls(store="s3", s3_bucket="b", s3_access_key_id="k", s3_secret_access_key="")
        empty = cls(store="s3", s3_bucket="b", s3_endpoint_url="", s3_region="", s3_access_key_id="",
                    s3_secret_access_key="", work_root="")  # compose's ${VAR:-}: unset, not '' or Path('.')
        assert (empty.s3_endpoint_url, empty.s3_region, empty.s3_access_key_id, empty.work_root) == (None,) * 4
        monkeypatch.setenv("SPINQUANT_STORE", "s3")
        with pytest.raises(ValidationError, match="no bucket is set"):
            cls()
        for k, v in s3_server.env("env-prefix/").items():
            monkeypatch.setenv(k, v)
        s3 = make_store(cls(work_root=tmp_path / "scratch"))
        assert isinstance(s3, S3Store) and s3.bucket == s3_server.bucket and s3.prefix == "env-prefix/"
        assert s3.work_dir() == tmp_path / "scratch" and "test-secret" not in repr(cls())
        s3.put_bytes("texts/x.txt", b"x")  # the credentials from settings work against the server
        assert s3.exists("texts/x.txt")
        for k in s3_server.env(""):
            monkeypatch.delenv(k)


def test_store_check_command_creates_the_bucket(s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m api store check --create-bucket``: what compose runs once against its S3 server."""
    from api.__main__ import main
    from service.settings import api_settings

    bucket = f"fresh-{uuid.uuid4().hex[:8]}"
    for k, v in {**s3_server.env("p/"), "SPINQUANT_S3_BUCKET": bucket}.items():
        monkeypatch.setenv(k, v)
    api_settings.cache_clear()
    try:
        assert main(["store", "check"]) == 1
        assert "NoSuchBucket" in capsys.readouterr().err
        assert main(["store", "check", "--create-bucket"]) == 0
        assert "(bucket created)" in capsys.readouterr().out
        assert main(["store", "check", "--create-bucket"]) == 0
        out = capsys.readouterr().out
        assert "artifact store ok" in out and "created" not in out
        assert "Contents" not in s3_server.client().list_objects_v2(Bucket=bucket)  # the probe is gone
        monkeypatch.setenv("SPINQUANT_STORE", "local")
        monkeypatch.setenv("SPINQUANT_ARTIFACT_ROOT", str(tmp_path / "a"))
        api_settings.cache_clear()
        assert main(["store", "check", "--create-bucket"]) == 0 and "LocalStore" in capsys.readouterr().out
        assert [p.name for p in (tmp_path / "a").iterdir()] == [".probe"]
    finally:
        api_settings.cache_clear()


def test_stack_on_s3_runs_a_job_and_serves_its_files(s3_server, tmp_path: Path) -> None:
    """API and worker on the S3 store: upload texts, run a job, download every file (whole and ranged)."""
    from scripts.stack import Stack
    from tests.stack_helpers import Api

    t0 = time.monotonic()
    prefix = f"stack-{uuid.uuid4().hex[:8]}/"
    work = tmp_path / "scratch"
    with Stack(tmp_path / "stack", extra_env={**s3_server.env(prefix), "SPINQUANT_WORK_ROOT": str(work)}) as stack:
        api = Api(stack, stack.token("s3"))
        r = api.submit(api.job_body(steps=2, seed=5))
        assert r.status_code == 202, r.text
        job = api.wait(r.json()["id"], timeout=120)
        assert job["status"] == "succeeded", job
        arts = {a["name"]: a for a in job["artifacts"]}
        assert {"SHA256SUMS", "model/model.safetensors", "model/config.json"} <= set(arts)
        for name, art in arts.items():
            resp = api.http.get(art["url"])
            assert resp.status_code == 200, resp.text
            assert hashlib.sha256(resp.content).hexdigest() == art["sha256"] and len(resp.content) == art["bytes"]
            assert resp.headers["etag"] == f'"{art["sha256"]}"' and resp.headers["x-checksum-sha256"] == art["sha256"]
            assert resp.headers["content-length"] == str(art["bytes"]) and resp.headers["accept-ranges"] == "bytes"
            assert resp.headers["content-disposition"] == f'attachment; filename="{name.rsplit("/", 1)[-1]}"'
        art = arts["model/model.safetensors"]
        url, size = art["url"], art["bytes"]
        full = api.http.get(url).content
        part = api.http.get(url, headers={"Range": "bytes=100-1099"})
        assert part.status_code == 206 and part.content == full[100:1100]
        assert part.headers["content-range"] == f"bytes 100-1099/{size}" and part.headers["content-length"] == "1000"
        assert part.headers["etag"] == f'"{art["sha256"]}"'
        tail = api.http.get(url, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == full[-10:]
        assert tail.headers["content-range"] == f"bytes {size - 10}-{size - 1}/{size}"
        rest = api.http.get(url, headers={"Range": f"bytes={size - 5}-"})
        assert rest.status_code == 206 and rest.content == full[-5:]
        clipped = api.http.get(url, headers={"Range": f"bytes=0-{size + 100}"})
        assert clipped.status_code == 206 and clipped.content == full
        bad = api.http.get(url, headers={"Range": f"bytes={size}-"})
        assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{size}"
        assert api.http.get(url, headers={"Range": "bytes=abc"}).status_code == 400
        stale = api.http.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
        assert stale.status_code == 200 and stale.content == full
        same = api.http.get(url, headers={"If-None-Match": f'"{art["sha256"]}"'})
        assert same.status_code == 304 and same.content == b""
        # The files are in the bucket (not under the stack's artifact root), and the scratch is cleaned up.
        raw = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)["Contents"]
        keys = {o["Key"].removeprefix(prefix) for o in raw}
        assert f"jobs/{job['id']}/.complete" in keys and f"jobs/{job['id']}/model/model.safetensors" in keys
        assert sum(k.startswith("texts/") for k in keys) == 2
        assert not (stack.root / "artifacts" / "jobs").exists() and list(work.iterdir()) == []
    print(f"s3 stack test: {time.monotonic() - t0:.1f}s")
