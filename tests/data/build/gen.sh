#!/usr/bin/env bash
# Regenerates golden.json: builds compat.nix with Nix 2.8 (sandbox on, a chroot store) and records
# each output's path, NAR hash and references, plus the sha256 of the busybox used (the paths
# depend on it).  Usage: tests/data/build/gen.sh   (needs nix-bin and busybox-static)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'chmod -R u+w "$work"; rm -rf "$work"' EXIT
mkdir -p "$work/bb/bin"
cp /bin/busybox "$work/bb/bin/busybox"
cp "$here/compat.nix" "$work/"
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command\nsandbox = true\nbuild-users-group ='
nix-build --store "$work/store" "$work/compat.nix" -A top --no-out-link >/dev/null
nix path-info --store "$work/store" --json -r $(nix-build --store "$work/store" "$work/compat.nix" -A top --no-out-link) \
  > "$work/info.json"
python3 - "$work/info.json" "$here/golden.json" <<'PY'
import hashlib, json, sys
info = json.load(open(sys.argv[1]))
out = {"busybox_sha256": hashlib.sha256(open("/bin/busybox", "rb").read()).hexdigest(),
       "paths": {i["path"]: {"narHash": i["narHash"], "narSize": i["narSize"],
                             "references": sorted(i.get("references", []))}
                 for i in info if not i["path"].endswith("-bb")}}
json.dump(out, open(sys.argv[2], "w"), indent=1, sort_keys=True)
PY
echo "wrote $here/golden.json"
