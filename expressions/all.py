"""Every package of the set, for `pure build expressions/all.py` and
`pure build --check expressions/all.py` (each output rebuilt and compared bit for bit)."""

import pkgs.seeds as seeds
from pkgs.devshell import devshell
from pkgs.hello import hello
from pkgs.mylib import greet, libgreet
from pkgs.stdenv import bmake
from pkgs.toolchain import bootstrap_tools, untar, zig_cc

#: What is built from the seeds (the seeds themselves are fixed-output: --check refetches them).
built = [bootstrap_tools, zig_cc, untar, bmake, hello, libgreet, greet, devshell]
default = built
fetched = seeds.default
#: A cheap subset for the test suite's --check (one musl build instead of five).
quick_check = [bootstrap_tools, zig_cc, libgreet, devshell]
