"""Ray job entry point: ``ray job submit -- python jobs/train.py --data OUT --output RUN --workers 2 ...``.

Same flags as ``rnb train``; inside a Ray job RAY_ADDRESS points at the cluster.
"""

import sys

from rnb_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
