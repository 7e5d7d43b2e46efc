# Builds the bootstrap tools: the static busybox seed plus one symlink per applet, so that
# $out/bin is a PATH entry with a POSIX shell and the core utilities.  Run as
#   $busybox/bin/busybox sh -e bootstrap-tools.sh
# with nothing else on PATH, so every command goes through busybox explicitly.
bb="$busybox/bin/busybox"
$bb mkdir -p "$out/bin"
$bb cp "$bb" "$out/bin/busybox"
$bb chmod 0555 "$out/bin/busybox"
cd "$out/bin"
for applet in $("$out/bin/busybox" --list); do
    case "$applet" in
        busybox) ;;
        # busybox 'ar' cannot write archives; the C toolchain supplies ar.  'linuxrc' and 'init'
        # make no sense outside a boot image.
        ar|linuxrc|init) ;;
        *) $bb ln -s busybox "$applet" ;;
    esac
done
"$out/bin/sh" -c 'echo "bootstrap tools: $(ls | wc -l) commands in $0"' "$out/bin"
