"""qworld.sweep.location: one API over local disk and a real S3 server (moto, over HTTP)."""

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from qworld.sweep.location import Location, StorageError, check_storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """An experiment location on local disk, or in a fresh bucket of the test S3 server."""
    if request.param == "local":
        return Location.of(tmp_path / "exp")
    bucket = request.getfixturevalue("s3_bucket")
    return Location.of(f"{bucket}/results/exp")


def test_of_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = Location.of("results/x")
    assert rel.is_local and rel.uri == str(tmp_path / "results" / "x") == str(rel)
    assert rel.local_path == tmp_path / "results" / "x" and rel.path == rel.uri
    assert isinstance(rel.fs, pafs.LocalFileSystem)
    assert Location.of(f"file://{tmp_path}/results/x") == rel
    assert Location.of(Path("results/x")) == rel and Location.of(rel) is rel
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Location.of("~/results/x") == rel
    assert os.fspath(rel) == rel.path and Path(rel) == rel.local_path
    assert rel.name == "x" and rel.parent.uri == str(tmp_path / "results")
    assert (rel / "a" / "b.txt").uri == str(tmp_path / "results/x/a/b.txt")
    assert rel.child("a/b", "c").uri == str(tmp_path / "results/x/a/b/c")


def test_of_uris(s3_bucket):
    loc = Location.of(f"{s3_bucket}/results/exp/")
    bucket = s3_bucket[len("s3://"):]
    assert not loc.is_local and loc.local_path is None
    assert loc.uri == f"{s3_bucket}/results/exp" == str(loc) and loc.path == f"{bucket}/results/exp"
    assert (loc / "sweep.yaml").uri == f"{s3_bucket}/results/exp/sweep.yaml"
    assert loc.name == "exp" and loc.parent.uri == f"{s3_bucket}/results"
    with pytest.raises(TypeError, match="not a local path"):
        os.fspath(loc)  # a remote location never becomes a local folder named "s3:"


@pytest.mark.parametrize("bad, match", [("foo://bucket/x", "unknown scheme"),
                                        ("s3:/bucket/x", "missing slash")])
def test_of_refuses(bad, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=match):
        Location.of(bad)
    assert list(tmp_path.iterdir()) == []


def test_read_write_list_move_delete(root):
    assert not root.exists() and root.list() == []
    root.makedirs()
    frag = root / "worldmodels.parquet" / "trial=a-ckpt=000001.parquet"
    frag.write_bytes(b"one")
    (root / "worldmodels.parquet" / "trial=a-ckpt=000002.parquet").write_bytes(b"two")
    (root / "sweep.yaml").write_text("name: x\n")
    assert frag.exists() and frag.is_file() and not frag.is_dir()
    assert (root / "worldmodels.parquet").is_dir()
    assert frag.read_bytes() == b"one" and (root / "sweep.yaml").read_text() == "name: x\n"
    frag.write_bytes(b"ONE")  # replaces
    assert frag.read_bytes() == b"ONE"
    names = [c.name for c in (root / "worldmodels.parquet").list("trial=*-ckpt=*.parquet")]
    assert names == ["trial=a-ckpt=000001.parquet", "trial=a-ckpt=000002.parquet"]
    assert [c.name for c in root.list("*.yaml")] == ["sweep.yaml"]
    assert [c.name for c in root.list(kind="dir")] == ["worldmodels.parquet"]
    assert all(c.uri.startswith(root.uri + "/") for c in root.list())
    dest = root / "worldmodels.parquet.damaged" / frag.name
    assert frag.move_to(dest) == dest
    assert not frag.exists() and dest.read_bytes() == b"ONE"
    with pytest.raises(FileNotFoundError):
        frag.move_to(dest)
    with pytest.raises(FileNotFoundError):
        frag.read_bytes()
    dest.delete()
    assert not dest.exists()
    with pytest.raises(FileNotFoundError):
        dest.delete()
    assert (root / "nothing").list() == []


def test_a_missing_bucket_is_no_empty_folder(s3_bucket):
    loc = Location.of("s3://qworld-no-such-bucket/results/exp")
    with pytest.raises(OSError, match="bucket 'qworld-no-such-bucket' does not exist") as info:
        loc.list()
    assert not isinstance(info.value, FileNotFoundError)
    assert not loc.exists()


def test_local_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails midway leaves the old file and no temporary file behind."""
    loc = Location.of(tmp_path / "f.bin")
    loc.write_bytes(b"old")

    def boom(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="No space"):
        loc.write_bytes(b"new" * 1000)
    assert loc.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_s3_write_is_one_put_to_the_final_key(s3_bucket, s3_server):
    """No temporary key and no rename: the only object is the final one."""
    loc = Location.of(f"{s3_bucket}/exp/worldmodels.parquet/trial=a-ckpt=000001.parquet")
    loc.write_bytes(b"x" * 1000)
    fs = loc.fs
    keys = [i.path for i in fs.get_file_info(pafs.FileSelector(s3_bucket[5:], recursive=True))
            if i.type == pafs.FileType.File]
    assert keys == [loc.path]


def test_endpoint_from_aws_endpoint_url_s3(s3_bucket, s3_server, monkeypatch):
    endpoint, _ = s3_server
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    loc = Location.of(f"{s3_bucket}/x.txt")
    loc.write_text("hi")
    assert loc.read_text() == "hi"


def test_other_os_errors_propagate(tmp_path):
    """Only a missing file is FileNotFoundError: a permission error is not turned into one."""
    class Denied(pafs.LocalFileSystem):
        pass

    loc = Location.of(tmp_path / "f")
    loc.write_bytes(b"x")

    class DenyingFS:
        def open_input_stream(self, path):
            raise PermissionError(13, "Permission denied", path)

    denied = Location(fs=DenyingFS(), path=loc.path, uri=loc.uri)
    with pytest.raises(PermissionError):
        denied.read_bytes()


def test_check_storage_local(tmp_path):
    assert check_storage(tmp_path / "new" / "exp").uri == str(tmp_path / "new" / "exp")
    assert not (tmp_path / "new").exists()  # nothing created
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a folder"):
        check_storage(tmp_path / "file" / "exp")


def test_check_storage_s3(s3_bucket, s3_server, monkeypatch):
    endpoint, _ = s3_server
    assert check_storage(f"{s3_bucket}/results").uri == f"{s3_bucket}/results"
    assert not Location.of(f"{s3_bucket}/results").exists()  # nothing created
    with pytest.raises(StorageError, match="bucket 'qworld-no-such-bucket' does not exist"):
        check_storage("s3://qworld-no-such-bucket/results")
    with pytest.raises(StorageError, match="unknown scheme"):
        check_storage("nosuch://bucket/results")
    with pytest.raises(StorageError, match="no bucket"):
        check_storage("s3://")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(StorageError, match="no AWS credentials"):
        check_storage(f"{s3_bucket}/results")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(StorageError, match="cannot reach|connect"):
        check_storage(f"{s3_bucket}/results")


@pytest.mark.parametrize("listing_error, says", [
    ("AWS Error INVALID_ACCESS_KEY_ID during ListObjectsV2 operation: The AWS Access Key Id you provided "
     "does not exist in our records.", "invalid credentials"),
    ("AWS Error SIGNATURE_DOES_NOT_MATCH during ListObjectsV2 operation", "invalid credentials"),
    ("AWS Error ACCESS_DENIED during ListObjectsV2 operation: Access Denied", "permission denied"),
])
def test_check_storage_names_what_a_refusing_server_says(listing_error, says, monkeypatch):
    """A real S3 refuses a HEAD of the bucket with a bare 403; the listing's error names why.
    (moto does not check credentials, so its answers are stood in for here.)"""
    class Refusing:
        def get_file_info(self, what):
            if isinstance(what, pafs.FileSelector):
                raise OSError(listing_error)
            raise OSError("When getting information for bucket 'b': AWS Error UNKNOWN (HTTP status 403) "
                          "during HeadBucket operation: No response body.")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setattr(Location, "of", classmethod(lambda cls, x: cls(fs=Refusing(), path="b/x", uri="s3://b/x")))
    with pytest.raises(StorageError, match=f"^s3://b/x: {says} \\(AWS Error"):
        check_storage("s3://b/x")
