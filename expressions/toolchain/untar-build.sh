
PATH="$cc/bin:$tools/bin"
mkdir -p "$out/bin"
cc -O2 -o "$out/bin/untar" "$src"
# Self-test: a round trip through busybox tar (ustar) must give back the same tree.
cd "$TMPDIR" && mkdir -p t/a/b x && echo hi > t/a/b/f && chmod +x t/a/b/f && ln -s b/f t/a/l
tar cf t.tar t && "$out/bin/untar" -C x < t.tar
[ "$(cat x/t/a/b/f)" = hi ] && [ -x x/t/a/b/f ] && [ "$(readlink x/t/a/l)" = b/f ]
echo "untar: ok"
