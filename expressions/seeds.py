"""The bootstrap seeds and upstream source tarballs, as fixed-output derivations.

Everything purestore builds grows from two binaries: a static busybox (shell and core utilities)
and the zig compiler (a static C toolchain with bundled musl).  Both are obtained with the
registry clients (``apt-get``, ``pip``) by the builtin fetchers of
``purestore/build/registry_fetch.py`` and enter the store as fixed-output paths: an artifact with
another hash is refused.  ``bootstrap/seeds.lock`` is the human-facing lock file (where each
artifact comes from and how to obtain it again); ``PINS`` below carries the same data, and
``tests/test_seeds.py`` checks that the two agree.

Attributes: ``busybox``, ``zig`` (seeds), ``sources`` (name -> tarball derivation),
``hello_src``, ``bmake_src``, ``make_src``; ``default`` is the list of all of them.
"""

from purestore.expr import derivation

SYSTEM = "x86_64-linux"

# name -> pin; must agree with bootstrap/seeds.lock.
PINS = {
    "busybox": dict(
        version="1.35.0", source="apt", package="busybox-static",
        package_version="1:1.35.0-4+deb12u1+b1", member="bin/busybox",
        sha256="3d9f2889d6782537624a4e1a10e68a2ddd53e0ee8bac02676f27308f42ec6bf6",
        store_hash="sha256:494cdad037cf7d0a75ee816fc060b92663de1309602aff43c2f9ce55dade4c40",
        store_hash_mode="recursive",
    ),
    "zig": dict(
        version="0.17.0", source="pip", package="ziglang", package_version="0.17.0",
        file="ziglang-0.17.0-py3-none-manylinux_2_12_x86_64.manylinux2010_x86_64.musllinux_1_1_x86_64.whl",
        sha256="97079827064a7492cce5541ceb438ae8003ce1e54e399676da2d62fb7a5dc08b",
        store_hash="sha256:18de3bfe34d9f443da30a48009988f961140bb5143af3c5ba168fc1ee237351b",
        store_hash_mode="recursive",
    ),
    "bmake-20200710.tar.gz": dict(
        version="20200710", source="apt-source", package="bmake", package_version="20200710-15",
        file="bmake_20200710.orig.tar.gz",
        sha256="6538fc4319ef79d178dca76d3b869f7aa93a9bb7b510df08a7d872c01a56b76c",
        store_hash="sha256:6538fc4319ef79d178dca76d3b869f7aa93a9bb7b510df08a7d872c01a56b76c",
        store_hash_mode="flat",
    ),
    "hello-2.10.tar.gz": dict(
        version="2.10", source="apt-source", package="hello", package_version="2.10-3",
        file="hello_2.10.orig.tar.gz",
        sha256="31e066137a962676e89f69d1b65382de95a7ef7d914b8cb956f41ea72e0f516b",
        store_hash="sha256:31e066137a962676e89f69d1b65382de95a7ef7d914b8cb956f41ea72e0f516b",
        store_hash_mode="flat",
    ),
    "make-4.3.tar.gz": dict(
        version="4.3", source="apt-source", package="make-dfsg", package_version="4.3-4.1",
        file="make-dfsg_4.3.orig.tar.gz",
        sha256="be4c17542578824e745f83bcd2a9ba264206187247cb6a5f5df99b0a9d1f9047",
        store_hash="sha256:be4c17542578824e745f83bcd2a9ba264206187247cb6a5f5df99b0a9d1f9047",
        store_hash_mode="flat",
    ),
}


def fetch_seed(name: str):
    """The fixed-output derivation that obtains pinned artifact ``name`` (a key of PINS)."""
    pin = PINS[name]
    algo, _, digest = pin["store_hash"].partition(":")
    common = dict(
        name=name if name.endswith(".tar.gz") else f"{name}-{pin['version']}",
        system=SYSTEM,
        package=pin["package"],
        version=pin["package_version"],
        sha256=pin["sha256"],
        outputHash=digest,
        outputHashAlgo=algo,
        outputHashMode=pin["store_hash_mode"],
        # Fetches do not depend on how they are run: nothing to rebuild when the URL-less
        # client changes, and a cached copy is as good as a downloaded one.
        preferLocalBuild=True,
    )
    if pin["source"] == "pip":
        return derivation(builder="builtin:fetch-pip", file=pin["file"], unpack=True, **common)
    if pin["source"] == "apt":
        return derivation(builder="builtin:fetch-apt", kind="binary", member=pin["member"],
                          keepPath=True, executable=True, **common)
    return derivation(builder="builtin:fetch-apt", kind="source", file=pin["file"], **common)


busybox = fetch_seed("busybox")
zig = fetch_seed("zig")
sources = {n: fetch_seed(n) for n in PINS if n.endswith(".tar.gz")}
bmake_src = sources["bmake-20200710.tar.gz"]
hello_src = sources["hello-2.10.tar.gz"]
make_src = sources["make-4.3.tar.gz"]

default = [busybox, zig, *sources.values()]
