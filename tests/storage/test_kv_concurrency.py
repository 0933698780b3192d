"""KV page store concurrency, exactly what the store promises: any number of threads on one store; one writer
process and readonly reader processes; a page that vanishes between two reads is a miss, never an exception."""

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from seekax.storage.kv_store import KVPageStore

PT, D = 16, 256  # 8 KiB bf16-sized pages as uint16


def _prompt(i, pages=4):
    return np.arange(pages * PT) + 100_000 * i


def _pages(i, n=4):
    """Page contents are a function of the prompt, so any reader can check what it got."""
    return np.random.default_rng(i).integers(0, 2**16, size=(n, PT, D), dtype=np.uint16).view(np.float16)


def _check(results, ids):
    for (n, got), i in zip(results, ids):
        assert n % PT == 0 and got.shape[0] == n // PT
        np.testing.assert_array_equal(got.view(np.uint16), _pages(i)[:n // PT].view(np.uint16))


def _open(path, **kw):
    return KVPageStore(path, page_shape=(PT, D), dtype="float16", capacity_pages=12, **kw)


def test_page_vanishing_between_two_reads_is_a_miss_for_every_request(tmp_path, monkeypatch):
    """Two requests need the same page; it is overwritten between their reads (the first read sees other
    bytes). Both must get the prefix before it, and the bookkeeping must not trip over the dropped page."""
    with _open(tmp_path / "kv") as kv:
        kv.put_pages(_prompt(0), _pages(0))
        real_get, seen, lock = kv._backend.get, set(), threading.Lock()
        victim = list(kv._lru)[2]  # page 2 of prompt 0

        def racing_get(keys, out):
            bad = real_get(keys, out)
            with lock:
                if victim in keys and victim not in seen:  # the first reader of the page sees it overwritten
                    seen.add(victim)
                    out[keys.index(victim)] ^= 0xFF
            return bad
        monkeypatch.setattr(kv._backend, "get", racing_get)
        results = kv.match_prefixes([_prompt(0), _prompt(0)])
        assert [n for n, _ in results] == [2 * PT, 2 * PT]
        _check(results, [0, 0])
        assert kv.stats()["corrupt_pages"] == 1 and len(kv) == 2
        assert kv.match_prefix(_prompt(0))[0] == 2 * PT


def test_threads_share_one_store(tmp_path):
    """Writers (with evictions) and readers on threads of one process: no exception, only right pages."""
    errors = []
    with _open(tmp_path / "kv") as kv:
        def writer(w):
            try:
                for r in range(30):
                    i = (w * 7 + r) % 9
                    kv.put_pages(_prompt(i), _pages(i))
            except Exception as e:  # noqa: BLE001 - collected for the assert
                errors.append(e)

        def reader():
            try:
                for r in range(40):
                    ids = [r % 9, (r + 4) % 9, r % 9]
                    _check(kv.match_prefixes([_prompt(i) for i in ids]), ids)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)] + [
            threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert kv.stats()["evictions"] > 0 and kv.stats()["hits"] > 0


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_kv_concurrency import _open, _pages, _prompt
    with _open(sys.argv[1]) as kv:
        print("ready", flush=True)
        for r in range(int(sys.argv[3])):  # capacity 12 pages = 3 prompts: every put evicts, slots are reused
            for i in (r % 3, 3 + r % 2, 5, r % 3):  # and prompt r % 3 is put again after being evicted
                kv.put_pages(_prompt(i), _pages(i))
""")


def test_reader_process_racing_an_evicting_writer(tmp_path):
    path = tmp_path / "kv"
    with _open(path) as kv:  # the store exists before the reader opens it
        kv.put_pages(_prompt(0), _pages(0))
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(Path(__file__).parent),
                          "150"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert w.stdout.readline().strip() == "ready", w.stderr.read()
        with _open(path, readonly=True) as reader:
            ids, rounds, hits = [0, 1, 2, 0, 5], 0, 0
            while w.poll() is None or rounds < 20:
                results = reader.match_prefixes([_prompt(i) for i in ids])
                _check(results, ids)  # right pages or a shorter prefix: never wrong bytes, never an exception
                hits += sum(n for n, _ in results)
                rounds += 1
            stats = reader.stats()
    finally:
        w.wait(timeout=60)
    assert w.returncode == 0, w.stderr.read()
    assert hits > 0 and stats["readonly"]
    print(f"reader: {rounds} rounds, {hits // PT} pages served, {stats['corrupt_pages']} raced pages as misses")


def test_one_writer_process_readers_follow_it(tmp_path):
    path = tmp_path / "kv"
    with _open(path) as writer:
        with pytest.raises(ValueError, match="path=.*no other process.*readonly=True"):
            _open(path)
        with _open(path, readonly=True) as reader:
            assert reader.match_prefix(_prompt(0))[0] == 0
            writer.put_pages(_prompt(0), _pages(0))
            _check([reader.match_prefix(_prompt(0))], [0])  # followed the log
            with pytest.raises(ValueError, match="put_pages=.*readonly"):
                reader.put_pages(_prompt(1), _pages(1))
            for r in range(40):  # the writer compacts its log (rewritten under a new inode) along the way
                writer.put_pages(_prompt(10 + r % 5), _pages(10 + r % 5))
            _check([reader.match_prefix(_prompt(10 + 39 % 5))], [10 + 39 % 5])
            assert len(reader) == len(writer)
    with _open(path) as again:  # the lock went with the writer
        assert len(again) == 12
    with pytest.raises(ValueError, match="path=.*existing KV store"):
        _open(tmp_path / "nothing", readonly=True)


def test_tensorstore_reader_refreshes(tmp_path):
    url = f"file://{tmp_path}/ts/"
    with _open(url) as writer, _open(url, readonly=True) as reader:
        writer.put_pages(_prompt(0), _pages(0))
        assert reader.match_prefix(_prompt(0))[0] == 0  # listed when it opened: nothing yet
        assert reader.refresh() == 4
        _check([reader.match_prefix(_prompt(0))], [0])
        for i in (1, 2, 3):  # evicts prompt 0
            writer.put_pages(_prompt(i), _pages(i))
        _check([reader.match_prefix(_prompt(0))], [0])  # deleted since: a miss (shorter), never wrong bytes
        reader.refresh()
        assert reader.match_prefix(_prompt(0))[0] == 0
        _check([reader.match_prefix(_prompt(3))], [3])
