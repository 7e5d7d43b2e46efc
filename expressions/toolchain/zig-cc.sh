# Wraps the zig seed as a conventional C toolchain: cc/gcc/c++/g++ (zig cc / zig c++ for
# x86_64-linux-musl, static by default), ld (ld.lld), ar, ranlib, objcopy, strip.
# Run as  $tools/bin/sh -e zig-cc.sh  with env: tools, zig, target.
PATH="$tools/bin"
export PATH
zigbin="$zig/ziglang/zig"
[ -x "$zigbin" ] || { echo "zig-cc: no zig at $zigbin" >&2; exit 1; }
mkdir -p "$out/bin"

wrap() {  # wrap NAME ZIG-SUBCOMMAND...
    name=$1; shift
    {
        echo "#!$tools/bin/sh"
        echo "# $name: purestore's wrapper around zig ($*)"
        echo "# zig needs a writable cache: one fixed place per build (\$TMPDIR is /build in the sandbox)."
        echo ': "${ZIG_GLOBAL_CACHE_DIR:=${TMPDIR:-/tmp}/.zig-cache}"'
        echo ': "${ZIG_LOCAL_CACHE_DIR:=$ZIG_GLOBAL_CACHE_DIR}"'
        echo 'export ZIG_GLOBAL_CACHE_DIR ZIG_LOCAL_CACHE_DIR'
        echo "exec $zigbin $* \"\$@\""
    } > "$out/bin/$name"
    chmod 0555 "$out/bin/$name"
}

# The compiler drivers strip debug information when they link (-Wl,--strip-debug), as Nix's
# fixup does: musl's debug info names zig's source tree, which would otherwise make every
# program refer to the whole compiler at run time.  PURE_CC_KEEP_DEBUG=1 keeps it.
wrap_cc() {  # wrap_cc NAME ZIG-SUBCOMMAND
    {
        echo "#!$tools/bin/sh"
        echo "# $1: purestore's wrapper around zig $2 -target $target"
        echo ': "${ZIG_GLOBAL_CACHE_DIR:=${TMPDIR:-/tmp}/.zig-cache}"'
        echo ': "${ZIG_LOCAL_CACHE_DIR:=$ZIG_GLOBAL_CACHE_DIR}"'
        echo 'export ZIG_GLOBAL_CACHE_DIR ZIG_LOCAL_CACHE_DIR'
        echo 'link=1'
        echo 'for a in "$@"; do case "$a" in -c|-S|-E|-M|-MM|-fsyntax-only|--version|-v|-V|-qversion|-print-*|-dump*) link=0 ;; esac; done'
        echo 'if [ "$link" = 1 ] && [ -z "${PURE_CC_KEEP_DEBUG:-}" ]; then set -- "$@" -Wl,--strip-debug; fi'
        echo "exec $zigbin $2 -target $target \"\$@\""
    } > "$out/bin/$1"
    chmod 0555 "$out/bin/$1"
}
wrap_cc cc cc
wrap_cc gcc cc
wrap_cc c++ c++
wrap_cc g++ c++
wrap cpp cc -target "$target" -E
wrap ld ld.lld
wrap ar ar
wrap ranlib ranlib
wrap objcopy objcopy
wrap zig

# strip: zig objcopy --strip-all IN OUT, in place for each argument (options are ignored).
{
    echo "#!$tools/bin/sh"
    echo "for f in \"\$@\"; do case \"\$f\" in -*) continue;; esac"
    echo "  $out/bin/objcopy --strip-all \"\$f\" \"\$f.stripped\" && mv \"\$f.stripped\" \"\$f\"; done"
} > "$out/bin/strip"
chmod 0555 "$out/bin/strip"

# Smoke test: compile (not link: linking would build musl, ~40 s, which every consumer does
# anyway) and archive an object, proving that zig runs here (it needs /proc) and the cache works.
cd "$TMPDIR"
printf '#include <stdio.h>\nint f(void){return puts("zig-cc works");}\n' > t.c
"$out/bin/cc" -O2 -c -o t.o t.c
"$out/bin/ar" rcs libt.a t.o
"$out/bin/ranlib" libt.a
echo "zig-cc: $("$out/bin/cc" --version | head -n 1)"
