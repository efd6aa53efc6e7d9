"""Ray job entry point: ``ray job submit -- python jobs/assign.py --domains OUT/domains.json --input ... --output ...``.

Same flags as ``rnb assign``; inside a Ray job RAY_ADDRESS points at the cluster.
"""

import sys

from rnb_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["assign", *sys.argv[1:]]))
