"""Getting weights: ``suprem_weights download | import | verify`` against an HTTP server on 127.0.0.1
started here (with Range support written here), serving files built here. No test touches the
internet: the registry entries are pointed at the loopback server."""
from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from suprem_net.cli.weights import main as weights_main
from suprem_net.errors import SupremError
from suprem_net.networks import build_network
from suprem_net.weights import REGISTRY, import_file, load_pretrained, resolve_checkpoint, weights_dir
from suprem_net.weights.download import direct_url, download


class Server:
    """Serves ``files`` (path -> bytes); ``status`` (path -> list of HTTP codes to answer first);
    ``cut`` (path -> how many full responses to break off half-way); ``redirect`` (path -> where a
    302 points). Logs (path, Range header)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.status: dict[str, list[int]] = {}
        self.cut: dict[str, int] = {}
        self.redirect: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path, rng = h.path.split("?")[0], h.headers.get("Range")
        self.requests.append((path, rng))
        if path in self.redirect:  # as Hugging Face's resolve/ URLs answer
            h.send_response(302)
            h.send_header("Location", self.redirect[path])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if self.status.get(path):
            code = self.status[path].pop(0)
            h.send_response(code)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = self.files.get(path)
        if data is None:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        if start >= len(data):
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{len(data)}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        body = data[start:]
        h.send_response(206 if rng else 200)
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if self.cut.get(path, 0) > 0:  # send half, then close the connection
            self.cut[path] -= 1
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("SUPREM_weights", str(d))
    return d


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serve(server: Server, monkeypatch, name: str, data: bytes, *, sha: bool = True, path: str | None = None):
    """Point registry entry ``name`` at ``data`` on the loopback server (with its size and SHA-256)."""
    path = path or f"/{name}.pth"
    server.files[path] = data
    entry = dataclasses.replace(REGISTRY[name], url=server.url(path), mirror_url="",
                                size=len(data) if sha else None, sha256=_sha(data) if sha else None)
    monkeypatch.setitem(REGISTRY, name, entry)
    return entry


def _payload(n: int = 3_000_001, seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).numpy().tobytes()


def _nothing_partial(cache: Path, entry) -> bool:
    return not (cache / ".partial" / f"{entry.file}.part").exists() and not list(cache.glob(".tmp-*"))


# ---------------------------------------------------------------- download


def test_clean_download_then_verify(server, cache, monkeypatch, capsys):
    data = _payload()
    entry = _serve(server, monkeypatch, "suprem_unet", data)
    assert weights_main(["download", "suprem_unet"]) == 0
    path = cache / entry.file
    assert path.read_bytes() == data and capsys.readouterr().out.strip() == str(path)
    assert (cache / f"{entry.file}.sha256").read_text().split()[0] == _sha(data)
    assert _nothing_partial(cache, entry) and server.requests == [("/suprem_unet.pth", None)]
    assert resolve_checkpoint("suprem_unet") == path
    assert weights_main(["download", "suprem_unet"]) == 0  # present: nothing fetched again
    assert len(server.requests) == 1
    assert weights_main(["verify"]) == 0
    assert re.search(r"^ok\s+suprem_unet\s", capsys.readouterr().out, re.M)
    corrupted = bytearray(data)
    corrupted[1000] ^= 1
    path.write_bytes(bytes(corrupted))
    with pytest.raises(SystemExit) as e:
        weights_main(["verify"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert re.search(r"^MISMATCH\s+suprem_unet\s", out, re.M)
    assert err.startswith(f"error: {path}: SHA-256 ") and err.count("\n") == 1


def test_cut_half_way_and_resumed(server, cache, monkeypatch):
    data = _payload(4_000_000, seed=1)
    entry = _serve(server, monkeypatch, "suprem_swinunetr", data)
    server.cut["/suprem_swinunetr.pth"] = 1
    path = download(entry, retries=2, backoff=0.0, progress=False)
    assert _sha(path.read_bytes()) == _sha(data) and _nothing_partial(cache, entry)
    (first, no_range), (second, resumed) = server.requests
    assert first == second == "/suprem_swinunetr.pth" and no_range is None
    offset = int(re.fullmatch(r"bytes=(\d+)-", resumed).group(1))  # what reached the disk before the cut
    assert len(data) // 2 - 65536 < offset <= len(data) // 2


def test_interrupted_run_resumes_from_the_partial_file(server, cache, monkeypatch):
    data = _payload(2_500_000, seed=2)
    entry = _serve(server, monkeypatch, "suprem_unet", data)
    part = cache / ".partial" / f"{entry.file}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1_000_000])  # what an interrupted run left
    assert not (cache / entry.file).exists()
    with pytest.raises(SupremError, match="suprem_weights download suprem_unet"):
        resolve_checkpoint("suprem_unet")  # the loader never sees the partial file
    assert download(entry, retries=0, backoff=0.0, progress=False).read_bytes() == data
    assert server.requests == [("/suprem_unet.pth", "bytes=1000000-")]


def test_cut_more_often_than_retried_keeps_the_bytes(server, cache, monkeypatch, capsys):
    data = _payload(2_000_000, seed=3)
    entry = _serve(server, monkeypatch, "suprem_unet", data)
    server.cut["/suprem_unet.pth"] = 5
    with pytest.raises(SystemExit) as e:
        weights_main(["download", "suprem_unet", "--retries", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: suprem_unet: download of {entry.url} failed: ") and err.count("\n") == 1
    assert "run the same command again to resume" in err and not (cache / entry.file).exists()
    kept = (cache / ".partial" / f"{entry.file}.part").stat().st_size
    assert 1_000_000 < kept < len(data)  # half, then half of the rest (less what each cut lost in flight)
    server.cut.clear()
    assert weights_main(["download", "suprem_unet"]) == 0 and (cache / entry.file).read_bytes() == data
    assert [r for _, r in server.requests][0] is None and server.requests[-1][1] == f"bytes={kept}-"
    assert len(server.requests) == 3


def test_wrong_checksum_refused_and_nothing_left(server, cache, monkeypatch, capsys):
    data = _payload(1_000_000, seed=4)
    entry = dataclasses.replace(REGISTRY["suprem_segresnet"], url=server.url("/seg.pth"), mirror_url="")
    server.files["/seg.pth"] = data  # not the file the registry's (third-party) SHA-256 describes
    monkeypatch.setitem(REGISTRY, "suprem_segresnet", entry)
    with pytest.raises(SystemExit) as e:
        weights_main(["download", "suprem_segresnet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: suprem_segresnet: download of {entry.url}: SHA-256 {_sha(data)} differs from "
                          f"the expected {entry.sha256} (unverified") and err.count("\n") == 1
    assert "the download was deleted" in err
    assert not (cache / entry.file).exists() and _nothing_partial(cache, entry)


@pytest.mark.parametrize("code,text", [(404, "HTTP 404 Not Found"), (500, "HTTP 500 Internal Server Error")])
def test_http_errors_are_one_line(server, cache, monkeypatch, capsys, code, text):
    entry = _serve(server, monkeypatch, "dodnet", b"x" * 10)
    server.files.clear()
    if code == 500:
        server.files["/dodnet.pth"] = b"x" * 10
        server.status["/dodnet.pth"] = [500] * 10
    with pytest.raises(SystemExit) as e:
        weights_main(["download", "dodnet", "--retries", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: dodnet: download of {entry.url} failed: {text}\n"
    assert not (cache / entry.file).exists()


def test_retries_with_backoff_and_mirror(server, cache, monkeypatch):
    data = _payload(500_000, seed=5)
    entry = _serve(server, monkeypatch, "suprem_unet", data)
    server.status["/suprem_unet.pth"] = [503, 500]  # urllib3's Retry answers these
    assert download(entry, retries=2, backoff=0.0, progress=False).read_bytes() == data
    assert [r for r in server.requests] == [("/suprem_unet.pth", None)] * 3
    (cache / entry.file).unlink()
    server.requests.clear()
    mirrored = dataclasses.replace(entry, url=server.url("/gone.pth"), mirror_url=server.url("/resolve.pth"))
    server.redirect["/resolve.pth"] = entry.url
    assert download(mirrored, retries=0, backoff=0.0, progress=False).read_bytes() == data
    assert [p for p, _ in server.requests] == ["/gone.pth", "/resolve.pth", "/suprem_unet.pth"]


def test_unreachable_host(cache, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.pth"
    monkeypatch.setitem(REGISTRY, "dodnet", dataclasses.replace(REGISTRY["dodnet"], url=url, mirror_url=""))
    with pytest.raises(SystemExit) as e:
        weights_main(["download", "dodnet", "--retries", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: dodnet: download of {url} failed: cannot connect (Connection refused)\n"


def test_download_usage_errors(cache, capsys):
    for argv in (["download"], ["download", "suprem_unet", "--all"], ["download", "nope"]):
        with pytest.raises(SystemExit) as e:
            weights_main(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_direct_url():
    assert direct_url("https://www.dropbox.com/scl/fi/x/f.pth?rlkey=k&dl=0") == \
        "https://www.dropbox.com/scl/fi/x/f.pth?rlkey=k&dl=1"
    assert direct_url(REGISTRY["suprem_unet"].url) == REGISTRY["suprem_unet"].url


# ---------------------------------------------------------------- import, layouts, the cache folder


def _dodnet_file(path: Path) -> OrderedDict:
    """A DoDNet checkpoint in its published layout (``module.`` + the task-conditioned head)."""
    torch.manual_seed(8)
    model = build_network({"family": "dodnet"}, 1, 4)
    sd = OrderedDict((f"module.{k}", v) for k, v in model.state_dict().items() if not k.startswith("cls_conv."))
    sd["module.precls_conv.0.weight"], sd["module.precls_conv.0.bias"] = torch.randn(32), torch.randn(32)
    sd["module.precls_conv.2.weight"], sd["module.precls_conv.2.bias"] = torch.randn(8, 32, 1, 1, 1), torch.randn(8)
    sd["module.GAP.0.weight"], sd["module.GAP.0.bias"] = torch.randn(256), torch.randn(256)
    sd["module.controller.weight"], sd["module.controller.bias"] = torch.randn(162, 263, 1, 1, 1), torch.randn(162)
    torch.save(sd, path)
    return sd


def test_import_renamed_file_recognised_by_layout(cache, tmp_path, capsys):
    src = tmp_path / "downloads" / "checkpoint (1).pth"
    src.parent.mkdir()
    _dodnet_file(src)
    assert weights_main(["import", str(src)]) == 0
    target = cache / REGISTRY["dodnet"].file
    assert capsys.readouterr().out.strip() == f"dodnet: {target}"
    assert target.read_bytes() == src.read_bytes() and src.is_file()  # copied, the original left alone
    assert (cache / f"{target.name}.sha256").read_text().split()[0] == _sha(src.read_bytes())
    model = build_network({"family": "dodnet"}, 1, 4)
    assert len(load_pretrained(model, "dodnet").loaded) == 103
    assert weights_main(["verify"]) == 0
    assert re.search(r"^ok \(recorded hash\)\s+dodnet\s", capsys.readouterr().out, re.M)


def test_import_refuses_what_is_not_the_entry(cache, tmp_path, capsys):
    seg = tmp_path / "seg.pth"
    net = build_network({"family": "segresnet", "kwargs": {}}, 1, 32)
    torch.save({"net": OrderedDict((f"module.{k}", v) for k, v in net.state_dict().items())}, seg)
    with pytest.raises(SystemExit) as e:  # the SegResNet layout, but not the published bytes
        weights_main(["import", str(seg)])
    assert e.value.code == 2
    assert "SHA-256" in capsys.readouterr().err
    dodnet = tmp_path / "d.pth"
    _dodnet_file(dodnet)
    with pytest.raises(SupremError, match="its key layout is not that of models_genesis_unet"):
        import_file(dodnet, "models_genesis_unet")
    junk = tmp_path / "notes.pth"
    junk.write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(SupremError, match="not a readable PyTorch checkpoint"):
        import_file(junk)
    assert not cache.exists() or not list(cache.iterdir())


def test_renamed_suprem_segresnet_loads_as_published(tmp_path, caplog):
    """A SuPreM SegResNet file under another name uses its adapter: the head is kept aside (transferred
    by class name), not reported as a shape mismatch, and the expected 81 tensors are checked."""
    torch.manual_seed(2)
    published = build_network({"family": "segresnet", "kwargs": {}}, 1, 32).state_dict()
    path = tmp_path / "segresnet_from_a_colleague.pth"
    torch.save({"net": OrderedDict((f"module.{k}", v) for k, v in published.items()), "epoch": 3}, path)
    model = build_network({"family": "segresnet", "kwargs": {}}, 1, 3)
    caplog.set_level("INFO")
    report = load_pretrained(model, path, target_labels={"background": 0, "liver": 1, "spleen": 2})
    assert report.source == "suprem_segresnet" and report.adapter == "segresnet_plain" and report.expected == 81
    assert len(report.loaded) == 81 and not report.shape_mismatch and sorted(report.head_transferred) == \
        ["liver", "spleen"]
    assert "recognised by its key layout as suprem_segresnet" in caplog.text


def test_missing_weights_print_the_command(cache, capsys):
    with pytest.raises(SystemExit) as e:
        weights_main(["check", "unimiss_small"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "get them with: suprem_weights download unimiss_small " in err and err.count("\n") == 1
    assert "suprem_weights import FILE --name unimiss_small" in err


def test_default_cache_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SUPREM_weights", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    folder = weights_dir()
    assert folder.parts[-2:] == ("suprem_net", "weights") and folder.is_relative_to(tmp_path)  # under XDG or HOME
    assert not folder.is_relative_to(tmp_path / "pretrained_weights")
    assert weights_main(["list"]) == 0
    assert f"weights folder: {folder} " in capsys.readouterr().out
    assert not (tmp_path / "pretrained_weights").exists()
