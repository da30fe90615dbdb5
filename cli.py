"""The ``inference-runner`` command: every subcommand, each registered by the module that implements it.

``inference_runner`` (the library) knows ``filesystem``, ``convert`` and ``export``; ``calibration``
adds ``calibrate`` and ``evaluate``; ``training.user_train`` adds ``train``.
This module sits above them all, so the library never imports the modules that
build on it (the import graph reads top-down, with no cycle).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import calibration
import inference_runner
import review
from training import user_train

REGISTRARS = (inference_runner.add_filesystem_command, inference_runner.add_convert_command,
              inference_runner.add_export_command, review.add_command, calibration.add_commands,
              user_train.add_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``inference-runner`` console script and ``python cli.py``."""
    return inference_runner.main(argv, REGISTRARS)


if __name__ == "__main__":
    sys.exit(main())
