"""robust/ is the algorithm layer: importing all of it must not pull in the cluster stack."""

import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys
import robust
names = [m.name for m in pkgutil.walk_packages(robust.__path__, "robust.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in ("ray", "deepspeed", "torch.distributed.run") if m in sys.modules)
print(len(names), leaked)
assert not leaked, leaked
"""


def test_robust_never_imports_ray_or_deepspeed():
    # A fresh interpreter: other tests in this process may have imported ray already.
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n_modules, leaked = out.stdout.split(" ", 1)
    assert int(n_modules) >= 10 and leaked.strip() == "[]"
