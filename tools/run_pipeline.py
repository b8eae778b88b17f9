#!/usr/bin/env python
"""The whole CutLER loop in one command (see cutler/pipeline/ and docs/pipeline.md).

    python tools/run_pipeline.py                                  # embedded synthetic default, CPU
    python tools/run_pipeline.py --dry-run                        # print the plan
    python tools/run_pipeline.py pipeline.run_dir=output/r2 selftrain.rounds=1
    python tools/run_pipeline.py --config-file pipeline/imagenet.yaml   # the published recipe
    python tools/run_pipeline.py --stage eval_r1 --force eval_r1        # one stage again
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cutler.pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
