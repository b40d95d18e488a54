import hashlib
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from coordinator.blob_http import RangeNotSatisfiableError, create_blob_app, parse_range
from coordinator.blobstore import BlobStore
from protocol.identity import Identity
from protocol.manifest import blob_hash

RUN = "run-http"
TRAINER = Identity.from_seed(bytes([5]) * 32)


@pytest.mark.parametrize(
    "header, expected",
    [
        (None, None),
        ("bytes=0-99", (0, 100)),
        ("bytes=100-", (100, 1000)),
        ("bytes=990-2000", (990, 1000)),
        ("bytes=-10", (990, 1000)),
        ("bytes=-5000", (0, 1000)),
        ("bytes=5-1", None),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("bytes=-", None),
    ],
)
def test_parse_range(header, expected):
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=-0"])
def test_unsatisfiable_ranges(header):
    with pytest.raises(RangeNotSatisfiableError):
        parse_range(header, 1000)


@pytest.fixture
def served(tmp_path, free_port):
    """A blob store with one 3 MB blob, served by uvicorn on 127.0.0.1 in a thread."""
    store = BlobStore(tmp_path / "policy", run_id=RUN, trainer_public_key=TRAINER.public_key)
    data = np.random.default_rng(0).integers(0, 256, size=3_000_000, dtype=np.uint8).tobytes()
    store.put_blob(blob_hash(data), data)
    config = uvicorn.Config(create_blob_app(store), host="127.0.0.1", port=free_port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{free_port}", data
    server.should_exit = True
    thread.join(timeout=20)
    assert not thread.is_alive()


def test_interrupted_download_resumes_with_range(served):
    base_url, data = served
    url = f"{base_url}/blobs/{blob_hash(data).hex()}"
    received = bytearray()
    with httpx.Client(timeout=30) as client:
        with client.stream("GET", url) as response:
            assert response.status_code == 200
            assert response.headers["accept-ranges"] == "bytes"
            assert int(response.headers["content-length"]) == len(data)
            for chunk in response.iter_raw(chunk_size=64 * 1024):
                received += chunk
                if len(received) >= 1_000_000:
                    break
        assert 0 < len(received) < len(data)
        resumed = client.get(url, headers={"Range": f"bytes={len(received)}-"})
    assert resumed.status_code == 206
    assert resumed.headers["content-range"] == f"bytes {len(received)}-{len(data) - 1}/{len(data)}"
    received += resumed.content
    assert hashlib.sha256(received).digest() == blob_hash(data)


def test_status_codes(served):
    base_url, data = served
    url = f"{base_url}/blobs/{blob_hash(data).hex()}"
    with httpx.Client(timeout=30) as client:
        assert client.get(url, headers={"Range": "bytes=10-19"}).content == data[10:20]
        head = client.head(url)
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
        unsatisfiable = client.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert unsatisfiable.status_code == 416
        assert unsatisfiable.headers["content-range"] == f"bytes */{len(data)}"
        assert client.get(f"{base_url}/blobs/{'0' * 64}").status_code == 404
        assert client.get(f"{base_url}/blobs/not-a-hash").status_code == 404
