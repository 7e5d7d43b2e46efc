"""The Python twin of cases.nix: every attribute must give the same .drv bytes and paths."""

from purestore.expr import derivation, fetchurl, source, to_file

system = "x86_64-linux"
h256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def mk(**attrs):
    base = dict(system=system, builder="/bin/sh", args=["-c", "echo > $out"])
    base.update(attrs)
    return derivation(**base)


fod_flat_sha256_base16 = mk(name="fod-a", outputHashMode="flat", outputHashAlgo="sha256", outputHash=h256)
fod_flat_sha256_nix32 = mk(name="fod-b", outputHashAlgo="sha256", outputHash="094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic")
fod_flat_sha256_sri = mk(name="fod-c", outputHash="sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=")
fod_flat_sha1_base16 = mk(name="fod-d", outputHashAlgo="sha1", outputHash="aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d")
fod_rec_sha1_nix32 = mk(name="fod-e", outputHashMode="recursive", outputHashAlgo="sha1", outputHash="9m1skbnr5i43n3yypvda5s65vhfwdx5a")
fod_rec_sha1_sri = mk(name="fod-f", outputHashMode="recursive", outputHash="sha1-qvTGHdzF6KLavt4PO0gs2a6pQ00=")
fod_rec_sha256_nix32 = mk(name="fod-g", outputHashMode="recursive", outputHashAlgo="sha256", outputHash="094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic")
fod_rec_sha256_typed = mk(name="fod-h", outputHashMode="recursive", outputHash=f"sha256:{h256}")
fod_flat_sha512_sri = mk(name="fod-i", outputHash="sha512-m3HSJL1i83hdltRq0+o9czGb+8KJDKra4t/3JRlnPKcjI8PZm6XBHXx6zG4UuMXaDEZjR1wuXDre9G9zvN7AQw==")
fod_rec_sha512_base16 = mk(name="fod-j", outputHashMode="recursive", outputHashAlgo="sha512", outputHash="9b71d224bd62f3785d96d46ad3ea3d73319bfbc2890caadae2dff72519673ca72323c3d99ba5c11d7c7acc6e14b8c5da0c4663475c2e5c3adef46f73bcdec043")
fod_rec_sha512_nix32 = mk(name="fod-k", outputHashMode="recursive", outputHashAlgo="sha512", outputHash="11w1pmwfdpz9pisbhp5qiv38q6dmidq2ipcqykw3p0sb6yrqcij79rwcwcjbxyzwbdal349qbxrncbk7pmd6snljrfpiwv2pljd4wcv")
fetch_flat = fetchurl(url="http://127.0.0.1/dist/a-1.0.tar.gz", hash="sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=")
fetch_unpack = fetchurl(url="http://127.0.0.1/dist/b.tar.gz", sha256=h256, unpack=True, name="b-src")
fetch_exec = fetchurl(url="http://127.0.0.1/dist/tool", sha1="aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d", executable=True)

multi = mk(name="multi-1.2", outputs=["out", "dev", "doc"])
multi_first_not_out = mk(name="libs", outputs=["lib", "out"])
ignore_nulls = mk(name="ign", __ignoreNulls=True, a=None, b="x", c=False)
coerced_args = mk(name="coerced", args=["-c", 1, True, False, None, 2.5, ["x", "y"]], builder=source("hello.txt"))
pass_as_file = mk(name="paf", passAsFile=["script", "data"], script="echo hi\n", data="x y z")
values = mk(
    name="values", yes=True, no=False, nothing=None, zero=0, neg=-42, big=1234567890123,
    list=["a", 1, True, False, None, ["n1", "n2"], [], "z"], empty=[], emptystr="",
    float=1.5,
)
strings = mk(
    name="strings",
    args=["-c", "quote\" backslash\\ nl\n tab\t cr\r dollar$ ${x} é ü 日本"],
    builder="/bin/s\"h",
    quoted='a "b" c',
    backslash="a\\b\\\\c",
    multiline="line1\nline2\n",
    tab="a\tb",
    cr="a\rb\r\n",
    dollar="$out ${HOME} $$",
    unicode="héllo wörld ☃ 🎉",
    **{'key with "quote"': "v"},
)
src_dir = mk(name="use-src-dir", src=source("src"))
src_dir_named = mk(name="use-src-named", src=source("src", name="mysrc"))
src_file = mk(name="use-src-file", src=source("hello.txt"), args=["-c", f"cat {source('hello.txt')} > $out"])
text_a = to_file("a.txt", "plain text\n")
text_b = to_file("b.sh", f"cat {source('hello.txt')} {text_a}\n")
use_texts = mk(name="use-texts", script=text_b, args=["-c", f". {text_b}"])

level1 = mk(name="level1", outputs=["out", "dev"])
level2 = mk(name="level2-0.1", args=["-c", f"cp {level1.outputs['dev']}/x $out; echo {fod_flat_sha256_base16}"], lib=level1)
level3 = mk(name="level3", deps=[level2, level1], script=text_a, args=["-c", f"echo {level2}"])
fod_with_inputs = mk(name="fod-inputs", outputHash="sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=", args=["-c", f"cat {level1}/x > $out"])
uses_fod_with_inputs = mk(name="uses-fod", src=fod_with_inputs)
drv_path_ref = mk(name="drvref", ref=level2.drv_path)

# every derivation above, for one `pure instantiate` run (sorted by name like nix-instantiate)
everything = {k: v for k, v in sorted(globals().items()) if hasattr(v, "drv_path")}
