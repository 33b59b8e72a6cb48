"""mitmproxy script: `mitmdump -s addons/gateway.py --set tollgate_policy=policies.yaml`.

It only builds the addon; everything else lives in the `tollgate` package beside this file.
"""
import os
import sys

# mitmproxy puts a script's folder on sys.path only while loading it; keep it there so the package's
# lazy imports work from a plain checkout as well as from the installed package.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

from tollgate.addon import Gateway  # noqa: E402

addons = [Gateway()]
