"""``python -m vram_operator.localcluster``: same as ``vram-operator local-cluster``."""

import sys

from vram_operator.localcluster.controlplane import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m vram_operator.localcluster"))
