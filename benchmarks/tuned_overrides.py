"""Print the best launch configs of a ``benchmarks/tune.py`` log as APPROXATTN_LAUNCH_OVERRIDES JSON.

Usage: python benchmarks/tuned_overrides.py tune.log [SETTING_PREFIX]   (default prefix "favor": the
headline cases' feature map); prints nothing when the log has no best line.
"""

import ast
import json
import re
import sys

prefix = sys.argv[2] if len(sys.argv) > 2 else "favor"
best = {}
for line in open(sys.argv[1]):
    found = re.match(r" best (.+) (\w+): (\(.*\))$", line.rstrip())
    if found and found.group(1).startswith(prefix):
        _, bn, warps, stages = ast.literal_eval(found.group(3))
        best[found.group(2)] = {"BN": bn, "num_warps": warps, "num_stages": stages}
print(json.dumps(best) if best else "")
