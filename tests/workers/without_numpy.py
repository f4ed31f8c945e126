"""Run the ``disttrain`` command as on a machine without numpy (torch does not declare it).

``import numpy`` raises ImportError here, as it would where numpy is not installed, so every
torch or disttrain path that silently needs numpy fails in the test instead of for a user.
"""

import runpy
import sys

sys.modules["numpy"] = None  # type: ignore[assignment]
sys.argv[0] = "disttrain"
runpy.run_module("disttrain", run_name="__main__", alter_sys=True)
