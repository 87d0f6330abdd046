"""Pre-train the MiniDefect base model (see dualanodiff_core/minidefect/pretrain.py and docs/minidefect.md).

    OMP_NUM_THREADS=1 python scripts/pretrain_minidefect.py --out dualanodiff_core/assets/minidefect-sd \
        --grid docs/images/minidefect_base_samples.png
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualanodiff_core.minidefect_pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
