"""``saetui`` with a fault injected into one rank (tests only): the rank named by
SAETUI_TEST_FAIL_RANK raises after SAETUI_TEST_FAIL_AFTER batches. Run under torchrun as
``torchrun ... tests/torchrun_failing_rank.py collect ...``."""

import os
import sys

from saetui.cli import main
from saetui.collect import metrics_phase, phases

if os.environ.get("RANK") == os.environ.get("SAETUI_TEST_FAIL_RANK"):
    encode_windows_of = phases.encode_windows_of
    batches = [0]

    def failing_encode_windows_of(run, batch):
        batches[0] += 1
        if batches[0] > int(os.environ.get("SAETUI_TEST_FAIL_AFTER", "3")):
            raise RuntimeError("injected failure")
        return encode_windows_of(run, batch)

    # the collecting phase and the reconstruction catch-up each bind it from collect.encoding
    phases.encode_windows_of = failing_encode_windows_of
    metrics_phase.encode_windows_of = failing_encode_windows_of

sys.exit(main(sys.argv[1:]))
