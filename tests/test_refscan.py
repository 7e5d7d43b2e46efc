"""formats/refscan.py: finding store path hash parts in a byte stream."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from purestore.errors import InvalidStorePath
from purestore.formats.hash import NIX32_ALPHABET
from purestore.formats.refscan import RefScanner, scan_bytes

hash_parts = st.text(alphabet=NIX32_ALPHABET, min_size=32, max_size=32)
A = "0" * 31 + "1"
B = "abcdfghijklmnpqrsvwxyz0123456789"


def naive(data: bytes, wanted) -> set:
    text = data.decode("latin-1")
    return {h for h in wanted if h in text}


def test_finds_paths_in_text():
    data = f"PATH=/nix/store/{A}-bash/bin:/nix/store/{B}-coreutils/bin".encode()
    assert scan_bytes(data, [A, B, "2" * 32]) == {A, B}


def test_hash_inside_a_longer_run_of_nix32_characters_is_found():
    """Nix checks every 32-character window, so a hash glued to other nix32 chars still counts."""
    data = ("xyz" + A + "abc").encode()
    assert scan_bytes(data, [A]) == {A}
    long_run = ("0123456789" * 100 + B + "abcd" * 100).encode()
    assert scan_bytes(long_run, [B, A]) == {B}


def test_non_nix32_characters_break_a_hash():
    for bad in "eotuEOTU-/\0":
        broken = A[:10] + bad + A[11:]
        assert scan_bytes(broken.encode(), [A]) == set()
    assert scan_bytes(A[:31].encode(), [A]) == set()


@given(hash_parts, st.binary(max_size=100), st.binary(max_size=100), st.data())
def test_matches_split_across_chunks_are_found(h, before, after, data):
    stream = before + h.encode() + after
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    s = RefScanner([h])
    prev = 0
    for c in cuts + [len(stream)]:
        s.feed(stream[prev:c])
        prev = c
    assert s.found == {h}


@given(st.lists(hash_parts, min_size=1, max_size=5), st.binary(max_size=300), st.data())
def test_scanner_agrees_with_naive_search(wanted, noise, data):
    pieces = [noise]
    for h in wanted:
        if data.draw(st.booleans()):
            pos = data.draw(st.integers(0, len(pieces[-1])))
            last = pieces.pop()
            pieces += [last[:pos] + h.encode(), last[pos:]]
    stream = b"".join(pieces)
    s = RefScanner(wanted)
    step = data.draw(st.integers(1, 64))
    for i in range(0, len(stream), step):
        s.feed(memoryview(stream)[i:i + step])
    assert s.found == naive(stream, wanted)


@settings(max_examples=30)
@given(st.integers(0, 2000))
def test_many_candidates(seed):
    rng = random.Random(seed)
    wanted = ["".join(rng.choice(NIX32_ALPHABET) for _ in range(32)) for _ in range(300)]
    present = rng.sample(wanted, 5)
    stream = b"".join(rng.randbytes(rng.randrange(50)) + f"/pure/store/{h}-x".encode() for h in present)
    assert scan_bytes(stream, wanted) == set(present)


def test_no_candidates_scans_nothing():
    s = RefScanner([])
    s.feed(A.encode())
    assert s.found == set()


@pytest.mark.parametrize("bad", ["", "0" * 31, "0" * 33, "e" * 32, "/nix/store/" + A])
def test_bad_hash_parts_are_rejected(bad):
    with pytest.raises(InvalidStorePath):
        RefScanner([bad])


@pytest.mark.slow
def test_scanning_is_fast_on_binary_and_long_runs():
    import time
    wanted = ["".join(random.Random(i).choice(NIX32_ALPHABET) for _ in range(32)) for i in range(50)]
    blob = random.Random(1).randbytes(16 << 20) + b"abcdfghijk" * (1 << 20)
    s = RefScanner(wanted)
    t = time.perf_counter()
    for i in range(0, len(blob), 1 << 20):
        s.feed(blob[i:i + (1 << 20)])
    assert time.perf_counter() - t < 3.0  # about 0.1 s on one core; generous for a loaded CI
