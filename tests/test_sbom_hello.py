"""The SBOM of GNU hello (expressions/hello.py, built from the bootstrap seeds): it validates
against the CycloneDX schema, lists the hello tarball with where it comes from and its pinned
sha256, lists the seeds, and separates run-time from build-time components.

Building hello takes minutes (the seeds are fetched with the registry clients, zig builds musl),
so the test is marked slow.  PURE_TEST_HELLO_STORE names a store root where hello may already be
built (shared with test_toolchain.py); downloads are shared through PURE_SEED_CACHE.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import REPO, run_pure
from purestore.build.sandbox import sandbox_available

HELLO_SHA256 = "31e066137a962676e89f69d1b65382de95a7ef7d914b8cb956f41ea72e0f516b"
REASON = sandbox_available()
if REASON is None and (shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None):
    REASON = "no apt-get/dpkg-deb (the seeds are fetched with the registry clients)"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.fixture(scope="module")
def hello(tmp_path_factory):
    root = os.environ.get("PURE_TEST_HELLO_STORE")
    if not root:
        root = str(tmp_path_factory.mktemp("hello-store"))
    seed_cache = os.environ.get("PURE_SEED_CACHE") or os.path.expanduser("~/.cache/purestore/seed-cache")
    p = run_pure("build", "-j", "2", "--no-link", str(REPO / "expressions" / "hello.py"), root=root,
                 env={"PURE_SEED_CACHE": seed_cache}, check=False, timeout=3000)
    if p.returncode != 0:  # test_toolchain.py fails for that; this module tests the SBOM
        pytest.skip(f"GNU hello does not build here:\n{p.stderr[-1500:]}")
    return root, p.stdout.split()[-1]


def test_hello_sbom_validates_and_lists_tarball_seeds_and_scopes(hello):
    from purestore.build.sbom import validate_cyclonedx
    root, out = hello
    text = run_pure("sbom", out, root=root).stdout
    validate_cyclonedx(text)
    doc = json.loads(text)
    meta = doc["metadata"]["component"]
    assert (meta["name"], meta["version"], meta["bom-ref"]) == ("hello", "2.10", out)
    comps = {c["bom-ref"]: c for c in doc["components"]}

    (tarball,) = [c for c in comps.values() if c["bom-ref"].endswith("-hello-2.10.tar.gz")]
    assert tarball["scope"] == "excluded"  # hello does not refer to its sources
    (ref,) = tarball["externalReferences"]
    assert ref["url"].startswith("pkg:deb/debian/hello@2.10")
    assert ref["hashes"] == [{"alg": "SHA-256", "content": HELLO_SHA256}]

    names = {c["name"] for c in comps.values()}
    assert {"busybox", "zig"} <= names, names  # the seeds
    seeds = [c for c in comps.values() if c["name"] in ("busybox", "zig") and c.get("purl")]
    assert seeds and all(c["externalReferences"][0]["hashes"] for c in seeds)

    runtime = {c["name"] for c in comps.values() if c["scope"] == "required"}
    build_only = {c["name"] for c in comps.values() if c["scope"] == "excluded"}
    assert "bmake" in build_only and "bmake" not in runtime  # the make that built hello
    # run time is exactly hello's reference closure (whatever the toolchain leaves in it)
    closure = set(run_pure("store", "requisites", out, root=root).stdout.split())
    assert {c["bom-ref"] for c in comps.values() if c["scope"] == "required"} | {out} == closure


def test_hello_component_hash_matches_pure_hash_path(hello):
    root, out = hello
    doc = json.loads(run_pure("sbom", "--runtime-only", out, root=root).stdout)
    want = run_pure("hash", "path", "--base16", root + out, root=root).stdout.strip()
    assert doc["metadata"]["component"]["hashes"] == [{"alg": "SHA-256", "content": want}]
