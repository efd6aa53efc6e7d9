"""Ray job entry point: ``ray job submit -- python jobs/assign.py --domains OUT/domains.json --input ... --output ...``.

Same flags as ``rnb assign``; inside a Ray job RAY_ADDRESS points at the cluster.
"""

import sys
from pathlib import Path

# `ray job submit --working-dir . -- python jobs/...` runs this file without the package installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rnb_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["assign", *sys.argv[1:]]))
