#!/usr/bin/env bash
# Recreate the NAR golden files in this directory with Nix 2.8 (nix-store --dump, nix hash path,
# nix hash file, nix nar ls).
#
#   tests/data/nar/make-golden.sh            # regenerate the golden files (needs nix-bin)
#   tests/data/nar/make-golden.sh trees DIR  # only build the input trees under DIR (no Nix);
#                                            # tests/test_fsnar.py uses this to get the same trees
#
# The trees are made deterministically (fixed contents, modes and symlink targets; umask 022).
# Outputs, for each tree T: T.nar (nix-store --dump), and one line per tree in hashes.tsv:
#   T <TAB> nar size <TAB> nix hash path (SRI) <TAB> --base32 <TAB> --type sha1 --base16
#     <TAB> --type sha512 --base64 <TAB> --type md5 --base32
# plus T.ls.json (nix nar ls --json -R T.nar /) and files.tsv (nix hash file of some files).
set -euo pipefail
umask 022
export LC_ALL=C

make_trees() {
    local d=$1
    mkdir -p "$d"
    cd "$d"

    printf 'hello\n' > hello                      # the FORMATS.md vector
    printf '#!/bin/sh\necho hi\n' > exec; chmod 0755 exec
    : > empty-file
    mkdir empty-dir
    ln -s /does/not/exist dangling-symlink
    ln -s hello symlink-to-file

    mkdir tree; cd tree
    # sizes around the 8-byte padding boundaries
    for n in 0 1 7 8 9 15 16 17 63 64 65; do
        head -c "$n" /dev/zero | tr '\0' 'x' > "size-$n"
    done
    printf 'group x only\n' > not-exec; chmod 0654 not-exec
    printf 'owner x only\n' > owner-exec; chmod 0700 owner-exec
    printf 'all x\n' > all-exec; chmod 0755 all-exec
    # names that sort differently as bytes, as text and case-insensitively
    for name in B a _ Z a.b a-b a0 A '~' '-' ' space' '.hidden' '...' 'x y z' 'Ab' 'aB' '9' '10' 'a~' 'a_'; do
        printf '%s\n' "$name" > "./$name"
    done
    # unicode (UTF-8 bytes >= 0x80 sort after ASCII)
    printf 'e acute\n' > 'é'
    printf 'u umlaut\n' > 'ü'
    printf 'nihongo\n' > '日本語'
    printf 'emoji\n' > '😀'
    printf 'z\n' > 'z'
    # a 255-byte name
    long=$(printf 'n%.0s' $(seq 1 255)); printf 'long\n' > "$long"
    # symlinks: relative, absolute, dangling, to a directory, chains, odd targets
    ln -s a rel-link
    ln -s /etc/passwd abs-link
    ln -s missing/../nowhere dangling
    ln -s sub dir-link
    ln -s rel-link chain
    ln -s '../../x y/ü' odd-target
    ln -s "$(printf 't%.0s' $(seq 1 300))" long-target
    # nested directories, an empty one, and a deep chain
    mkdir -p sub/inner/empty 'sub/with space' sub/ü
    printf 'inner file\n' > sub/inner/file
    printf '#!/bin/sh\n' > sub/inner/tool; chmod 0755 sub/inner/tool
    ln -s ../file 'sub/with space/up'
    printf 'x\n' > sub/ü/ö
    deep=deep; for i in $(seq 1 40); do deep="$deep/d$i"; done
    mkdir -p "$deep"; printf 'bottom\n' > "$deep/bottom"
    # a larger file with non-trivial contents (deterministic)
    awk 'BEGIN { for (i = 0; i < 9000; i++) printf "%08d line of a larger file\n", i * 7919 % 100003 }' > big.txt
    cd ..

    # a directory holding only symlinks and empty things
    mkdir links-only; cd links-only
    ln -s . self; ln -s .. parent; ln -s '' 2>/dev/null empty-target || true
    mkdir e; : > e/f
    cd ..

    # an executable root file whose contents are exactly 8 bytes
    printf '12345678' > exec8; chmod 0755 exec8
}

TREES="hello exec empty-file empty-dir dangling-symlink symlink-to-file tree links-only exec8"

if [[ ${1:-} == trees ]]; then
    make_trees "$2"
    exit 0
fi

here=$(cd "$(dirname "$0")" && pwd)
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command'
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
(make_trees "$work/t")
: > "$here/hashes.tsv"
for t in $TREES; do
    p="$work/t/$t"
    nix-store --dump "$p" > "$here/$t.nar"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$(stat -c %s "$here/$t.nar")" \
        "$(nix hash path "$p")" "$(nix hash path --base32 "$p")" \
        "$(nix hash path --type sha1 --base16 "$p")" "$(nix hash path --type sha512 --base64 "$p")" \
        "$(nix hash path --type md5 --base32 "$p")" >> "$here/hashes.tsv"
    nix nar ls --json -R "$here/$t.nar" / > "$here/$t.ls.json"
done
: > "$here/files.tsv"
for f in hello exec empty-file exec8 tree/big.txt tree/é; do
    printf '%s\t%s\t%s\t%s\n' "$f" "$(nix hash file "$work/t/$f")" "$(nix hash file --base32 "$work/t/$f")" \
        "$(nix hash file --type sha1 --base16 "$work/t/$f")" >> "$here/files.tsv"
done
nix --version > "$here/NIX_VERSION"
