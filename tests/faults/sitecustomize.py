"""Fault injection for tests that run training in subprocesses (torchrun workers included): a test puts this
directory on PYTHONPATH and sets QWEN3_TEST_FAULT = "exit" (the rank leaves with exit code 17) or "hang" (it sleeps
forever) for rank QWEN3_TEST_FAULT_RANK just before it runs iteration QWEN3_TEST_FAULT_ITERATION; only in the
first attempt of a torchrun job ($TORCHELASTIC_RESTART_COUNT 0 or unset), so a restarted job runs clean."""

from __future__ import annotations

import os

FAULT = os.environ.get("QWEN3_TEST_FAULT")
if FAULT and "LOCAL_RANK" in os.environ and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    import threading
    from typing import Any

    from qwen3_pretrain.train.trainer import Trainer

    rank, iteration = int(os.environ["QWEN3_TEST_FAULT_RANK"]), int(os.environ["QWEN3_TEST_FAULT_ITERATION"])
    train_step = Trainer.train_step

    def faulty_train_step(self: Trainer, batches: Any) -> Any:
        if self.env.rank == rank and self.state.iteration + 1 == iteration:
            print(f"fault injection: rank {rank} {FAULT}s before iteration {iteration}", flush=True)
            if FAULT == "exit":
                os._exit(17)
            threading.Event().wait()
        return train_step(self, batches)

    Trainer.train_step = faulty_train_step  # type: ignore[method-assign]
