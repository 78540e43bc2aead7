"""Remote shards over ``s3://`` for real (issue 27, item 8): s3fs against moto's standalone S3
server on 127.0.0.1, with credentials checked (moto's IAM authentication on). The encode-once
cache builds from the bucket as from local files, a run cut and resumed reads the exact
same samples, a shard whose bytes change under the same name is refused by its sha256, and
wrong credentials are a clear error that never shows the secret. ``gs://`` (gcsfs) takes
the same fsspec path in ``stages/common/remote.py``."""

from __future__ import annotations

import json
import logging
import urllib.request

import boto3
import pytest
import s3fs
import torch
from moto import server as moto_server
from test_trainer import cut_and_resume_over

from stages.common import remote, shard_index
from stages.common.data import ShardLoader, load_index
from stages.common.remote import ShardUnavailable
from stages.common.shards import ManifestError

BUCKET = "minisd-shards"
WRONG_SECRET = "wrong-secret-Zq8v3JkLmN0pQrSt"


def clear_s3fs_cache() -> None:
    """fsspec keeps one S3FileSystem per set of options: a change of credentials in the
    environment is only seen by a new one."""
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3(tiny_shards):
    """``(endpoint, access key id, secret)``: moto's S3 server holding the tiny shards in
    ``s3://minisd-shards/data/``, reachable only with that key pair."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Authentication on after the three IAM calls that make the user and its key.
    reset = f"{endpoint}/moto-api/reset-auth"
    urllib.request.urlopen(urllib.request.Request(reset, b"3", {"Content-Type": "text/plain"}))
    options = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", **options)
    iam.create_user(UserName="trainer")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}  # fmt: skip
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    key_id, secret = key["AccessKeyId"], key["SecretAccessKey"]
    client = boto3.client("s3", aws_access_key_id=key_id, aws_secret_access_key=secret, **options)
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(tiny_shards.rglob("*")):
        if path.is_file():
            name = f"data/{path.relative_to(tiny_shards).as_posix()}"
            client.put_object(Bucket=BUCKET, Key=name, Body=path.read_bytes())
    yield endpoint, key_id, secret, client
    server.stop()


@pytest.fixture
def creds(s3, monkeypatch, tmp_path):
    """The environment of a machine that holds the right key pair; a fresh shard cache."""
    endpoint, key_id, secret, client = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    clear_s3fs_cache()
    shard_index._REMOTE_INDEX.clear()  # a process keeps a remote split's index: each test reads anew
    remote.configure(str(tmp_path / "shard-cache"), max_gb=1.0, prefetch=2)
    yield client
    remote.configure()
    clear_s3fs_cache()
    shard_index._REMOTE_INDEX.clear()


def test_s3_shards_build_the_cache_and_a_run_resumes_on_the_exact_cursor(
    creds, tiny_shards, tmp_path
):
    from toy_stage import colour_summary

    from stages.common.cache import CacheConfig, ensure_cache

    url = f"s3://{BUCKET}/data"
    local = [b for b, _ in zip(ShardLoader(tiny_shards / "train", 8, 16, seed=1), range(14))]
    over_s3 = [b for b, _ in zip(ShardLoader(f"{url}/train", 8, 16, seed=1), range(14))]
    for a, b in zip(local, over_s3):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    cached = sorted(p.name for p in (tmp_path / "shard-cache").iterdir())
    assert len(cached) == 5 and all(n.endswith(".tar") for n in cached)  # verified copies

    # The encode-once cache built from the bucket equals the one built from local files.
    cfg = CacheConfig(shard_size=40, batch_size=16)

    def encode(batch):
        return {"x": colour_summary(batch["image"])}

    rows = list(range(96))
    from_s3 = ensure_cache(tmp_path / "a", {"e": 1}, encode, f"{url}/train", 16, cfg)
    from_disk = ensure_cache(tmp_path / "b", {"e": 1}, encode, tiny_shards / "train", 16, cfg)
    a, b = from_s3.__getitems__(rows), from_disk.__getitems__(rows)
    assert a["key"] == b["key"] and torch.equal(a["x"], b["x"])

    # Through the trainer: cut at step 3 and resumed equals a straight run.
    cut_and_resume_over(tmp_path, url)


def test_an_s3_shard_changed_under_the_same_name_is_refused(creds, tiny_shards, tmp_path):
    index = load_index(f"s3://{BUCKET}/data/train")
    assert index.keys[5] == "train000005"  # shard 0, as uploaded
    name = "data/train/shard-000002.tar"
    original = (tiny_shards / "train" / "shard-000002.tar").read_bytes()
    changed = bytearray(original)
    changed[600] ^= 0xFF
    creds.put_object(Bucket=BUCKET, Key=name, Body=bytes(changed))
    try:
        with pytest.raises(ShardUnavailable, match="the manifest says"):
            index.keys[45]
    finally:
        creds.put_object(Bucket=BUCKET, Key=name, Body=original)
    kept = [p.name for p in (tmp_path / "shard-cache").iterdir()]
    assert kept == [f"{index.manifest.shards[0].sha256}.tar"]  # nothing unverified kept


@pytest.mark.parametrize("wrong", ["secret", "key id"])
def test_wrong_s3_credentials_are_a_clear_error_without_the_secret(
    creds, monkeypatch, caplog, tmp_path, wrong
):
    index = load_index(f"s3://{BUCKET}/data/train")  # read with the right key pair
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    if wrong == "key id":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    clear_s3fs_cache()
    hint = "access refused: check the credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    with caplog.at_level(logging.DEBUG):  # botocore's and s3fs's own lines too
        with pytest.raises(ShardUnavailable) as refused:
            index.keys[5]  # a shard now: refused at once (trying again will not help)
        message = str(refused.value)
        assert "shard-000000.tar" in message and hint in message and "tries" not in message
        shard_index._REMOTE_INDEX.clear()
        with pytest.raises(ManifestError) as refused:
            load_index(f"s3://{BUCKET}/data/train")  # a split's manifest
        message += str(refused.value)
        assert f"s3://{BUCKET}/data/train/manifest.json" in message and hint in message
    assert WRONG_SECRET not in message and WRONG_SECRET not in caplog.text
    assert not list((tmp_path / "shard-cache").glob("*.tar"))


def test_secrets_are_redacted_from_messages(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    url = "https://b.s3.amazonaws.com/train/shard-000403.tar?X-Amz-Credential=AKIA%2Fx&X-Amz-Signature=abc123"
    text = remote.redact(f"{url} failed: key {WRONG_SECRET}")
    assert WRONG_SECRET not in text and "abc123" not in text and "AKIA%2Fx" not in text
    assert "shard-000403.tar" in text
    assert "access refused" not in remote.describe(OSError("shard-000403.tar: timed out"), url)
