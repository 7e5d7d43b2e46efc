"""GNU hello 2.10, built from the upstream release tarball with the bootstrap toolchain.

    pure build expressions/hello.py && ./result/bin/hello    # Hello, world!
"""

from pkgs.seeds import hello_src
from pkgs.stdenv import mk_derivation

hello = mk_derivation(
    "hello-2.10",
    hello_src,
    # No gettext in this world; the C library is musl (static), so nothing refers to the host.
    configure_flags=["--disable-nls"],
    do_check=True,
)

default = hello
