"""Per-module killed/survived/total of the last `mutmut run` (read from `mutmut results`)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict

out = subprocess.run(
    [sys.executable, "-m", "mutmut", "results", "--all", "true"],
    capture_output=True, text=True, check=True,
).stdout  # fmt: skip
by_module: dict[str, Counter[str]] = defaultdict(Counter)
for line in out.splitlines():
    name, sep, status = line.strip().rpartition(": ")
    if not sep:
        continue
    module = name.split(".x\u01c1")[0].split(".x_")[0]
    by_module[module][status] += 1
for module, c in sorted(by_module.items()):
    done = sum(n for s, n in c.items() if s != "not checked")
    killed = c["killed"] + c["timeout"]
    survived = c["survived"] + c["no tests"]  # a mutant no test runs is not killed
    share = f"{100 * survived / done:.1f}%" if done else "-"
    print(f"{module}: killed {killed} survived {survived} checked {done} of {sum(c.values())}"
          f" (no tests {c['no tests']}) survived {share}")  # fmt: skip
