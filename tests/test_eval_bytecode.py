"""Evaluation works when Python wants to write bytecode caches for modules imported meanwhile."""


from conftest import REPO, pure_env

import subprocess
import sys


def test_eval_with_empty_bytecode_cache_is_not_refused(tmp_path, store_root):
    # A fresh pycache prefix means every module imported during evaluation has no .pyc yet, so
    # Python tries to write one: pure mode must not turn that into a refusal.
    env = pure_env(store_root, extra={"PYTHONPYCACHEPREFIX": str(tmp_path / "pyc")})
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    expr = REPO / "expressions" / "examples" / "features.py"
    p = subprocess.run([sys.executable, "-m", "purestore.cli.main", "eval", str(expr)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "refused" not in p.stderr
