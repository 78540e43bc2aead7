"""Remote shards (stages/common/remote.py) from a local HTTP server on 127.0.0.1: the same
samples and resume as local files, a list file of shard URLs, a download cut half way
(retried) or always cut (a clear error), wrong bytes refused, the local shard cache's size
limit, and prefetching ahead of the reader."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_trainer import cut_and_resume_over

from stages.common import remote
from stages.common.data import ShardLoader, load_index
from stages.common.remote import ShardCache, ShardUnavailable

CUT: dict[str, int] = {}  # path -> how many more requests are cut half way
REQUESTS: Counter = Counter()


class Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        REQUESTS[self.path] += 1
        if CUT.get(self.path, 0) > 0:
            CUT[self.path] -= 1
            body = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])  # then the connection drops
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tiny_shards, tmp_path):
    """``(base URL, served folder)``: a copy of the tiny shards over HTTP."""
    served = tmp_path / "served"
    shutil.copytree(tiny_shards, served / "data")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    CUT.clear()
    REQUESTS.clear()
    remote.configure(str(tmp_path / "shard-cache"), max_gb=1.0, prefetch=2)
    yield f"http://127.0.0.1:{httpd.server_address[1]}/data", served / "data"
    httpd.shutdown()
    httpd.server_close()
    remote.configure()


def first_batches(loader, count: int) -> list[dict]:
    return [b for b, _ in zip(loader, range(count))]


def test_http_shards_read_as_local_ones_and_a_run_resumes_exactly(server, tiny_shards, tmp_path):
    url, _ = server
    local = first_batches(ShardLoader(tiny_shards / "train", 8, 16, seed=1), 14)  # > 1 epoch
    over_http = first_batches(ShardLoader(f"{url}/train", 8, 16, seed=1), 14)
    for a, b in zip(local, over_http):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    cached = sorted(p.name for p in (tmp_path / "shard-cache").iterdir())
    assert len(cached) == 5 and all(n.endswith(".tar") for n in cached)  # verified copies only

    # Through the trainer: cut at step 3 and resumed equals a straight run; no sample twice.
    whole = cut_and_resume_over(tmp_path, url)
    assert len({k for r in whole.seen for k in r["ids"]}) == 24


def test_a_list_file_of_shard_urls(server, tiny_shards, tmp_path):
    url, served = server
    names = sorted(p.name for p in (served / "train").glob("*.tar"))
    listing = tmp_path / "shards.txt"
    lines = ["# train and val shards"] + [f"{url}/train/{n}" for n in reversed(names)]
    lines += [f"{url}/val/{p.name}" for p in (served / "val").glob("*.tar")]
    listing.write_text("\n".join(lines) + "\n")
    index = load_index(remote.split_location(str(listing), "train"))
    assert list(index.urls) == [f"{url}/train/{n}" for n in names]  # the manifest's order
    local = load_index(tiny_shards / "train")
    assert [index.keys[i] for i in range(len(index))] == list(local.keys)
    short = tmp_path / "short.txt"
    short.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(Exception, match="does not list"):
        load_index(remote.split_location(str(short), "train"))


def test_cut_downloads_are_retried_and_wrong_bytes_are_refused(server, tmp_path):
    url, served = server
    index = load_index(f"{url}/train")
    CUT["/data/train/shard-000001.tar"] = 1  # cut once: the retry succeeds
    assert index.keys[25] == "train000025"
    assert REQUESTS["/data/train/shard-000001.tar"] == 2
    CUT["/data/train/shard-000002.tar"] = 99  # cut every time: a clear error
    with pytest.raises(ShardUnavailable, match=r"shard-000002.tar after 3 tries"):
        index.keys[45]
    shard = served / "train" / "shard-000003.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # other bytes than the manifest's
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardUnavailable, match="the manifest says"):
        index.keys[65]
    # Nothing half-downloaded or unverified is kept: shard 1 alone, verified (the reader
    # fetched no other shard: sample numbers come from the manifest).
    kept = [p.name for p in (tmp_path / "shard-cache").iterdir()]
    assert kept == [f"{index.manifest.shards[1].sha256}.tar"]


def test_the_shard_cache_keeps_its_limit_dropping_the_least_recently_used(server, tmp_path):
    url, served = server
    index = load_index(f"{url}/train")
    size = (served / "train" / "shard-000000.tar").stat().st_size
    cache = ShardCache(tmp_path / "small", max_bytes=int(2.5 * size))
    shards = index.manifest.shards
    for number in (0, 1, 0, 2, 3):  # 0 is used again after 1: 1 is the oldest then
        cache.local(index.urls[number], shards[number].sha256)
        time.sleep(0.02)  # distinct access times
    kept = {p.name for p in (tmp_path / "small").iterdir()}
    assert kept == {f"{shards[n].sha256}.tar" for n in (2, 3)}  # 1, then 0, were dropped
    assert sum(p.stat().st_size for p in (tmp_path / "small").iterdir()) <= 2.5 * size
    assert cache.fetched == 4  # shard 0 the second time came from disk


def test_shards_of_the_next_batches_are_prefetched(server, tmp_path):
    url, _ = server
    loader = ShardLoader(f"{url}/train", 4, 16, seed=4)  # prefetch: 2 batches ahead
    first = next(iter(loader))
    read = {int(k[-6:]) // 20 for k in first["key"]}  # shards of 20 samples
    assert read == {1, 3}  # seed 4's first batch; its next two batches need every shard
    cache = remote.shard_cache()
    deadline = time.monotonic() + 30
    while cache._inflight and time.monotonic() < deadline:
        time.sleep(0.05)
    for shard in (0, 2, 4):  # fetched before the reader asked for them
        assert cache.path_of(loader.index.manifest.shards[shard].sha256).exists(), shard


def test_the_encode_once_cache_builds_from_http_shards_as_from_local_ones(
    server, tiny_shards, tmp_path
):
    from toy_stage import colour_summary

    from stages.common.cache import CacheConfig, ensure_cache

    url, _ = server
    cfg = CacheConfig(shard_size=40, batch_size=16)

    def encode(batch):
        return {"x": colour_summary(batch["image"])}

    over_http = ensure_cache(tmp_path / "a", {"e": 1}, encode, f"{url}/train", 16, cfg)
    local = ensure_cache(tmp_path / "b", {"e": 1}, encode, tiny_shards / "train", 16, cfg)
    assert [p.name for p in (tmp_path / "a").iterdir()] == [
        p.name for p in (tmp_path / "b").iterdir()
    ]
    rows = list(range(96))
    a, b = over_http.__getitems__(rows), local.__getitems__(rows)
    assert a["key"] == b["key"] and torch.equal(a["x"], b["x"])
