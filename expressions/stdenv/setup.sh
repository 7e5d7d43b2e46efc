# purestore stdenv: the generic builder, run by the bootstrap busybox shell as
#   $builder -e $setup        (see expressions/stdenv/__init__.py)
#
# Phases, in order: unpack, patch, configure, build, check, install, fixup.  Each phase X can be
# replaced by setting the derivation attribute XPhase (shell code, eval'd), and extended with
# preX / postX.  dontX=1 skips it.  Inputs: $stdenvPath and $buildInputs (store paths whose bin/
# go on PATH, in that order after the toolchain), $src (a tarball or a directory), $patches.
#
# Everything that would make the output depend on the build host or the clock is pinned here:
# LC_ALL=C, TZ=UTC, umask 022, SOURCE_DATE_EPOCH (set by the builder; defaulted to 1 if not),
# and the fixup phase strips what makes outputs differ (libtool .la files, timestamps are
# canonicalised by the store, ar archives are written deterministically by the toolchain).

set -e
umask 022
export LC_ALL=C TZ=UTC
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1}"
export ZERO_AR_DATE=1

# The shell that runs this script: used for configure scripts, Makefiles and shebangs.
SHELL="$builder"
CONFIG_SHELL="$builder"
export SHELL CONFIG_SHELL

PATH=""
for p in $stdenvPath $buildInputs; do
    if [ -d "$p/bin" ]; then PATH="${PATH:+$PATH:}$p/bin"; fi
done
export PATH

# busybox's shell runs its own applets in preference to PATH (its 'ar' cannot write archives):
# name the toolchain's programs by absolute path, for make (BSD make's sys.mk uses ${AR} etc.)
# and configure scripts alike.  Derivations may still set these themselves.
findTool() {
    _ifs=$IFS; IFS=:
    for _d in $PATH; do
        if [ -x "$_d/$1" ] && [ ! -d "$_d/$1" ]; then IFS=$_ifs; echo "$_d/$1"; return 0; fi
    done
    IFS=$_ifs
    return 1
}
for _t in CC:cc CXX:c++ LD:ld AR:ar RANLIB:ranlib OBJCOPY:objcopy STRIP:strip; do
    _var=${_t%%:*}
    eval "_set=\${$_var:-}"
    if [ -z "$_set" ] && _p=$(findTool "${_t#*:}"); then export "$_var=$_p"; fi
done

# One place for every compiler cache: the same path in every build of a derivation (/build in the
# sandbox), so nothing that leaks into debug info differs between builds.
: "${TMPDIR:=/tmp}"
export ZIG_GLOBAL_CACHE_DIR="${ZIG_GLOBAL_CACHE_DIR:-$TMPDIR/.zig-cache}"
export ZIG_LOCAL_CACHE_DIR="${ZIG_LOCAL_CACHE_DIR:-$ZIG_GLOBAL_CACHE_DIR}"

# Build with all the cores the builder grants (purestore sets NIX_BUILD_CORES-style $cores).
jobs="${NIX_BUILD_CORES:-${PURE_BUILD_CORES:-1}}"
[ "$jobs" -gt 0 ] 2>/dev/null || jobs=1

header() { echo "@phase $1"; }

runHook() {
    eval "_hook=\${$1:-}"
    if [ -n "$_hook" ]; then eval "$_hook"; fi
}

# Rewrite '#!/bin/sh', '#!/usr/bin/env sh' and friends in executable scripts to the store shell,
# since the sandbox has no /bin/sh.
patchShebangs() {
    for dir in "$@"; do
        find "$dir" -type f -perm -0100 | while read -r f; do
            first=$(head -c 128 "$f" | head -n 1)
            case "$first" in
                "#!"*/bin/sh*|"#!"*/bin/bash*|"#!"*"/usr/bin/env sh"*|"#!"*"/usr/bin/env bash"*)
                    sed -i -e '1s|^#! *[^ ]*/\(env \)\{0,1\}\(ba\)\{0,1\}sh|#!'"$SHELL"'|' "$f"
                    ;;
            esac
        done
    done
}

unpackPhase() {
    runHook preUnpack
    if [ -z "${src:-}" ]; then echo "setup: no \$src given" >&2; exit 1; fi
    if [ -d "$src" ]; then
        cp -R "$src" ./source
        chmod -R u+w ./source
        sourceRoot=source
    else
        mkdir unpack
        # busybox tar does not guess the compression: pick the decompressor by magic number.
        magic=$(od -An -tx1 -N6 "$src" | tr -d ' \n')
        case "$magic" in
            1f8b*) decomp="gzip -dc" ;;
            fd377a585a00*) decomp="xz -dc" ;;
            425a68*) decomp="bzip2 -dc" ;;
            *) decomp="cat" ;;
        esac
        # untar (from the toolchain) also reads pre-POSIX archives, which busybox tar refuses.
        if command -v untar >/dev/null 2>&1; then
            $decomp < "$src" | untar -C unpack
        else
            $decomp < "$src" | (cd unpack && tar xf -)
        fi
        n=$(ls unpack | wc -l)
        if [ "$n" != 1 ]; then echo "setup: $src unpacked into $n entries, expected 1" >&2; exit 1; fi
        mv unpack/* . && rmdir unpack
        sourceRoot=$(ls -d */ | head -n 1)
        sourceRoot=${sourceRoot%/}
    fi
    cd "$sourceRoot"
    runHook postUnpack
}

patchPhase() {
    runHook prePatch
    for p in ${patches:-}; do
        echo "applying patch $p"
        case "$p" in
            *.gz) gzip -dc "$p" | patch -p1 ;;
            *) patch -p1 < "$p" ;;
        esac
    done
    patchShebangs .
    runHook postPatch
}

configurePhase() {
    runHook preConfigure
    if [ -x ./configure ] || [ -f ./configure ]; then
        echo "configure flags: --prefix=$out ${configureFlags:-}"
        "$SHELL" ./configure --prefix="$out" ${configureFlags:-}
    else
        echo "no configure script, doing nothing"
    fi
    runHook postConfigure
}

buildPhase() {
    runHook preBuild
    # Serial unless the derivation says otherwise: BSD make's parallel (jobs) mode does not treat
    # './lib/x.a' and 'lib/x.a' as one target, which automake's Makefiles rely on.
    if [ -n "${enableParallelBuilding:-}" ]; then set -- -j"$jobs"; else set --; fi
    make "$@" SHELL="$SHELL" ${makeFlags:-} ${buildFlags:-}
    runHook postBuild
}

checkPhase() {
    runHook preCheck
    make SHELL="$SHELL" ${makeFlags:-} ${checkTarget:-check}
    runHook postCheck
}

installPhase() {
    runHook preInstall
    make SHELL="$SHELL" ${makeFlags:-} ${installTarget:-install}
    runHook postInstall
}

fixupPhase() {
    runHook preFixup
    for o in $outputs; do
        eval "dir=\$$o"
        [ -e "$dir" ] || continue
        # libtool archives name the build directory and are useless to consumers.
        find "$dir" -name '*.la' -type f -exec rm -f {} \;
        # GNU info's directory index differs with what else was installed; it is regenerated.
        rm -f "$dir/share/info/dir"
        patchShebangs "$dir"
        # Writable by the owner only; the store canonicalises modes and times afterwards.
        chmod -R go-w "$dir"
    done
    runHook postFixup
}

genericBuild() {
    : "${outputs:=out}"
    cd "${NIX_BUILD_TOP:-$TMPDIR}"
    for phase in ${phases:-unpack patch configure build check install fixup}; do
        cap=$(printf '%s' "$phase" | cut -c1 | tr a-z A-Z)$(printf '%s' "$phase" | cut -c2-)
        eval "skip=\${dont$cap:-}"
        if [ "$phase" = check ] && [ -z "${doCheck:-}" ]; then skip=1; fi
        if [ -n "$skip" ]; then continue; fi
        header "$phase"
        eval "custom=\${${phase}Phase:-}"
        if [ -n "$custom" ]; then eval "$custom"; else "${phase}Phase"; fi
    done
    for o in $outputs; do
        eval "dir=\$$o"
        if [ ! -e "$dir" ]; then echo "setup: output '$o' ($dir) was not produced" >&2; exit 1; fi
    done
}

genericBuild
