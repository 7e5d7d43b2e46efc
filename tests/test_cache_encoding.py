"""Files a cache sends with a Content-Encoding (as S3 caches written with Nix's
narinfo-compression / ls-compression / log-compression store them, and as cache.nixos.org sends
its listings): decoded by pure as by Nix (checked against `nix store ls` where installed),
refused with a clear error when corrupt, too big or streamed; written that way to S3 caches."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading

import pytest

from conftest import DATA, HAVE_NIX, run_pure
from test_cache_support import PUB

GOLD = DATA / "cache" / "nix-cache"
TREE = "/nix/store/nai7hnixwpdj31gflmh2xaw00xjq4b7m-tree"
TREE_LS = ("-r--r--r--                    2 ./a\ndr-xr-xr-x                    0 ./sub\n"
           "lrwxrwxrwx                    0 ./sub/link -> ../a\n-r-xr-xr-x                   10 ./sub/x\n")


class EncodingServer:
    """Serves a cache directory, sending the files whose names end with one of ``suffixes``
    compressed with ``encoding`` and a ``Content-Encoding`` header saying so (``garble``:
    the header without the compression)."""

    def __init__(self, directory, encoding: str, suffixes=(".ls", ".narinfo"), garble: bool = False):
        from purestore.cache.content_encoding import encode

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: bool):
                path = os.path.join(directory, self.path.lstrip("/").split("?")[0])
                if not os.path.isfile(path):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = open(path, "rb").read()
                encoded = path.endswith(tuple(outer.suffixes))
                if encoded and not garble:
                    data = encode(encoding, data)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                if encoded:
                    self.send_header("Content-Encoding", encoding)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_GET(self):
                self._answer(True)

            def do_HEAD(self):
                self._answer(False)

            def log_message(self, *args):
                pass

        self.suffixes = suffixes
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("encoding", ["br", "gzip", "xz", "bzip2", "zstd"])
def test_encoded_listings_and_narinfos_are_read_as_nix_reads_them(tmp_path, encoding):
    server = EncodingServer(GOLD, encoding)
    try:
        r = run_pure("cache", "ls", "--trusted-public-keys", PUB, server.url, "-lR", TREE)
        assert r.stdout == TREE_LS
        if HAVE_NIX:  # Nix, reading the same server, sees the same listing
            env = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command",
                   "XDG_CACHE_HOME": str(tmp_path / "xdg")}
            nix = subprocess.run(["nix", "store", "ls", "--store", server.url, "-lR", TREE], env=env,
                                 capture_output=True, text=True)
            assert nix.returncode == 0 and nix.stdout == TREE_LS, nix.stderr
    finally:
        server.close()
    # substituted: the narinfo decoded
    server = EncodingServer(GOLD, encoding, suffixes=(".ls", ".narinfo"))
    try:
        dst = tmp_path / "dst"
        run_pure("--store-dir", "/nix/store", "copy", "--from", server.url, "--trusted-public-keys", PUB, TREE,
                 root=dst)
        run_pure("--store-dir", "/nix/store", "store", "verify", "--check-contents", root=dst)
        assert (dst / "nix/store" / os.path.basename(TREE) / "sub" / "x").read_bytes().startswith(b"#!")
    finally:
        server.close()


def test_bad_encodings_are_clear_errors_and_change_nothing(tmp_path):
    server = EncodingServer(GOLD, "br", garble=True)  # says br, sends the plain bytes
    try:
        dst = tmp_path / "dst"
        r = run_pure("--store-dir", "/nix/store", "copy", "--from", server.url, "--trusted-public-keys", PUB, TREE,
                     root=dst, check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "nai7hnixwpdj31gflmh2xaw00xjq4b7m.narinfo' is sent with Content-Encoding 'br' but is not valid br data" \
            in r.stderr, r.stderr
        assert not (dst / "nix/store" / os.path.basename(TREE)).exists()
    finally:
        server.close()
    server = EncodingServer(GOLD, "compress", suffixes=(".narinfo",), garble=True)  # one nobody decodes
    try:
        r = run_pure("cache", "path-info", "--trusted-public-keys", PUB, server.url, TREE, check=False)
        assert r.returncode == 1 and "Content-Encoding 'compress', which pure cannot decode" in r.stderr, r.stderr
    finally:
        server.close()


@pytest.mark.parametrize("size", [2 << 20, 64 << 10], ids=["streamed", "read-whole"])
def test_a_nar_with_a_content_encoding_is_refused(tmp_path, size):
    """A NAR over 1 MiB is streamed, a smaller one read whole; either, sent with a
    Content-Encoding, is refused by name (its compression belongs in the file, and FileHash is
    that of the stored bytes), not restored wrongly; the hint says what to change."""
    from test_cache_support import SEC, make_path, open_store

    key = tmp_path / "k.sec"
    key.write_text(SEC)
    root = tmp_path / "src"
    with open_store(root) as store:
        big = make_path(store, "big-1.0", {"blob": os.urandom(size)})
    cache = tmp_path / "cache"
    run_pure("copy", "--to", f"file://{cache}?compression=none&secret-key={key}", big.absolute("/pure/store"),
             root=root)
    server = EncodingServer(cache, "gzip", suffixes=(".nar",))
    try:
        r = run_pure("copy", "--from", server.url, "--trusted-public-keys", PUB, big.absolute("/pure/store"),
                     root=tmp_path / "dst", check=False)
        assert r.returncode == 1 and "is sent with Content-Encoding 'gzip': a NAR file must come as it is stored" \
            in r.stderr, r.stderr
        assert "hint: serve NAR files without a Content-Encoding" in r.stderr, r.stderr
        assert not (tmp_path / "dst" / "pure/store" / big.base_name).exists()
    finally:
        server.close()


@pytest.mark.parametrize("encoding", ["br", "gzip", "xz", "bzip2", "zstd"])
def test_decoding_is_bounded_and_checks_the_end(encoding):
    from purestore.cache.content_encoding import decode, encode
    from purestore.errors import CacheError

    bomb = encode(encoding, bytes(8 << 20))  # 8 MiB of zeros: a few KiB at most
    assert len(bomb) < 64 << 10
    with pytest.raises(CacheError, match=rf"decodes \({encoding}\) to more than 100000 bytes: refused"):
        decode(encoding, bomb, "'x.ls'", limit=100_000)
    assert decode(encoding, bomb, "'x.ls'") == bytes(8 << 20)
    with pytest.raises(CacheError, match="is truncated|is not valid"):
        decode(encoding, bomb[: len(bomb) // 2], "'x.ls'")
    assert decode("identity", b"as is", "'x'") == decode(None, b"as is", "'x'") == b"as is"
