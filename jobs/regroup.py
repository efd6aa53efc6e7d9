"""Ray job entry point: ``ray job submit -- python jobs/regroup.py --input ... --k 16 --output ...``.

Same flags as ``rnb regroup``; inside a Ray job RAY_ADDRESS points at the cluster.
"""

import sys

from rnb_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["regroup", *sys.argv[1:]]))
