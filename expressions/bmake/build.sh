# Phases for BSD make (bmake), sourced by the stdenv setup through configurePhase/buildPhase/
# installPhase = ". $bmakeBuild; bmake_configure" etc.  bmake needs no make to build: its
# boot-strap script generates make-bootstrap.sh, which compiles it with $CC.

bmake_configure() {
    # A bug in this release: 'getopt' (a source name) stands where 'getopt.o' should.
    sed -i -e 's/ for\.o getopt hash\.o/ for.o getopt.o hash.o/' make-bootstrap.sh.in
    grep -q ' getopt\.o ' make-bootstrap.sh.in || { echo "bmake: getopt fix did not apply" >&2; exit 1; }
    mkdir ../bmake-build
    cd ../bmake-build
    # The default shell of make's commands is compiled in: the store's shell, as there is no
    # /bin/sh in the sandbox.  The sys path is where we install the mk files.
    # (boot-strap forgets options given before --with-default-sys-path: keep that one first.)
    CC=cc "$SHELL" "$OLDPWD/boot-strap" -o "$PWD" --prefix="$out" \
        --with-default-sys-path="$out/share/mk" --with-defshell="$SHELL" op=configure
    grep -q "DEFSHELL_CUSTOM \"$SHELL\"" config.h || { echo "bmake: default shell not set" >&2; exit 1; }
}

bmake_build() {
    # Not 'op=build': that also runs bmake's unit tests, which expect a full-featured /bin/sh.
    "$SHELL" ./make-bootstrap.sh
    ./bmake -V MAKE_VERSION -f /dev/null >/dev/null 2>&1 || true
    [ -x ./bmake ] || { echo "bmake: no binary was built" >&2; exit 1; }
}

bmake_install() {
    mkdir -p "$out/bin" "$out/share/mk" "$out/share/man/man1"
    cp bmake "$out/bin/bmake"
    chmod 0555 "$out/bin/bmake"
    # automake's Makefiles call 'make' for recursion.
    ln -s bmake "$out/bin/make"
    src_dir=$(cd "$OLDPWD" && pwd)
    cp "$src_dir"/mk/*.mk "$out/share/mk/"
    mkdir -p "$out/share/mk/sys"
    cp "$src_dir"/mk/sys/*.mk "$out/share/mk/sys/"
    cp "$src_dir/bmake.1" "$out/share/man/man1/bmake.1"
    "$out/bin/bmake" -f /dev/null -V MAKE_VERSION
}
