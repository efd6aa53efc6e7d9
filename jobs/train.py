"""Ray job entry point: ``ray job submit -- python jobs/train.py --data OUT --output RUN --workers 2 ...``.

Same flags as ``rnb train``; inside a Ray job RAY_ADDRESS points at the cluster.
"""

import sys
from pathlib import Path

# `ray job submit --working-dir . -- python jobs/...` runs this file without the package installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rnb_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
