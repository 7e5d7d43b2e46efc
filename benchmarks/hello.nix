# The same derivation graph as expressions/hello.py (seeds -> bootstrap-tools -> zig-cc -> untar
# -> bmake -> hello), in the Nix language, with the same builder scripts and attributes, so that
# benchmarks/hello.py can time Nix building exactly what purestore builds.  The seeds are
# fixed-output paths that benchmarks/hello.py adds to the Nix store first (nix-store
# --add-fixed), so their builtin fetchers never run under Nix.
let
  system = "x86_64-linux";
  ex = ../expressions;
  src = path: name: builtins.path { inherit path name; };
  seed = name: hash: mode: derivation {
    inherit name system;
    builder = "builtin:purestore-seed";   # never run: the output is added beforehand
    outputHash = hash; outputHashAlgo = "sha256"; outputHashMode = mode;
  };
  busybox = seed "busybox-1.35.0" "494cdad037cf7d0a75ee816fc060b92663de1309602aff43c2f9ce55dade4c40" "recursive";
  zig = seed "zig-0.17.0" "18de3bfe34d9f443da30a48009988f961140bb5143af3c5ba168fc1ee237351b" "recursive";
  bmake_src = seed "bmake-20200710.tar.gz" "6538fc4319ef79d178dca76d3b869f7aa93a9bb7b510df08a7d872c01a56b76c" "flat";
  hello_src = seed "hello-2.10.tar.gz" "31e066137a962676e89f69d1b65382de95a7ef7d914b8cb956f41ea72e0f516b" "flat";

  bootstrap_tools = derivation {
    name = "bootstrap-tools-busybox-1.35.0"; inherit system busybox;
    builder = "${busybox}/bin/busybox";
    args = [ "sh" "-e" (src (ex + "/toolchain/bootstrap-tools.sh") "bootstrap-tools.sh") ];
  };
  zig_cc = derivation {
    name = "zig-cc-0.17.0"; inherit system zig;
    builder = "${bootstrap_tools}/bin/sh";
    args = [ "-e" (src (ex + "/toolchain/zig-cc.sh") "zig-cc.sh") ];
    tools = bootstrap_tools; target = "x86_64-linux-musl";
  };
  untar = derivation {
    name = "untar-1.0"; inherit system;
    builder = "${bootstrap_tools}/bin/sh";
    args = [ "-e" "-c" (builtins.readFile (ex + "/toolchain/untar-build.sh")) ];
    src = src (ex + "/toolchain/untar.c") "untar.c";
    cc = zig_cc; tools = bootstrap_tools;
  };
  setup = src (ex + "/stdenv/setup.sh") "stdenv-setup.sh";
  mk = toolchain: { name, src, ... }@attrs: derivation ({
    inherit name system src;
    builder = "${bootstrap_tools}/bin/sh";
    args = [ "-e" setup ];
    stdenvPath = toolchain; buildInputs = [ ]; configureFlags = [ ]; makeFlags = [ ];
    patches = [ ]; outputs = [ "out" ]; doCheck = false;
  } // attrs);
  bmake = mk [ zig_cc untar bootstrap_tools ] {
    name = "bmake-20200710"; src = bmake_src;
    bmakeBuild = src (ex + "/bmake/build.sh") "bmake-build.sh";
    configurePhase = ''. "$bmakeBuild"; bmake_configure'';
    buildPhase = ''. "$bmakeBuild"; bmake_build'';
    installPhase = ''. "$bmakeBuild"; bmake_install'';
  };
  hello = mk [ zig_cc bmake untar bootstrap_tools ] {
    name = "hello-2.10"; src = hello_src;
    configureFlags = [ "--disable-nls" ]; doCheck = true;
  };
in hello
