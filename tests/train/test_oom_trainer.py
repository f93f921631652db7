"""The out-of-memory back-off and data.batch_size=auto inside the trainer: a simulated CUDA OOM mid-run halves the
micro-batch, gives the weights of a run without it (to float rounding), logs one line, and a stop/resume after it is
bitwise exact; batch_size=auto on CPU trains at the documented default and the run's saved config holds the number."""

from __future__ import annotations

import torch
import yaml

from vitforge.checkpoint import load_checkpoint
from vitforge.config import load_config
from vitforge.train.oom import CPU_BATCH_SIZE
from vitforge.train.trainer import Trainer, train

# No dropout, drop path, mixing or BatchNorm: the micro-batched gradients equal the whole batch's up to rounding.
PLAIN = ["model.name=vit_demo", "data.train=digits", "data.limit=256", "data.aug.crop_padding=0",
         "data.aug.hflip=false", "train.device=cpu", "run.progress=none", "train.threads=1", "train.epochs=2",
         "data.batch_size=32", "train.grad_accum=2", "optim.name=adamw", "optim.lr=0.003", "data.val_split=0.25"]


class OomAt:
    """Raises CUDA OOM in the model's forward for batches over `fits` images while the run is at optimizer step
    `step` (a transient shortage, e.g. fragmentation)."""

    def __init__(self, trainer: Trainer, step: int, fits: int):
        self.t, self.step, self.fits, self.raised = trainer, step, fits, 0
        model = trainer.raw_model
        forward = model.forward

        def guarded(x, *a, **k):
            if model.training and self.t.state.step == self.step and x.shape[0] > self.fits:
                self.raised += 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return forward(x, *a, **k)

        model.forward = guarded


class StopAt:
    def __init__(self, step):
        self.step = step

    def on_step(self, t):
        if t.state.step == self.step:
            t.request_stop()


def _weights(run):
    return load_checkpoint(run, prefer="last")["model"]


def test_simulated_oom_mid_run_backs_off_and_matches_a_run_without_it(tmp_path, caplog):
    ref = train(load_config(None, [*PLAIN, f"run.dir={tmp_path}", "run.name=ref"]))

    t = Trainer(load_config(None, [*PLAIN, f"run.dir={tmp_path}", "run.name=oom"]))
    inject = OomAt(t, step=2, fits=8)
    with caplog.at_level("WARNING", logger="vitforge"):
        run = t.fit()
    assert inject.raised == 2 and (t.oom.micro_batch, t.oom.accum) == (8, 8)  # 32 -> 16 -> 8, 2 x 4 passes
    lines = [r.getMessage() for r in caplog.records if "out of device memory" in r.getMessage()]
    assert lines == ["out of device memory at a micro-batch of 32: continuing with micro-batches of 8, 8 per "
                     "optimizer step (effective batch 64 unchanged)"]
    assert "out of device memory at a micro-batch of 32" in (run / "train.log").read_text()
    ck = load_checkpoint(run, prefer="last")
    assert ck["oom"] == {"micro_batch": 8, "accum": 8, "batch_size": 32}
    a, b = _weights(ref), ck["model"]
    assert ck["progress"]["step"] == load_checkpoint(ref, prefer="last")["progress"]["step"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4)

    # Stopped after the back-off and resumed: the same micro-batches, so bitwise the same weights.
    t2 = Trainer(load_config(None, [*PLAIN, f"run.dir={tmp_path}", "run.name=cut"]), hooks=StopAt(4))
    OomAt(t2, step=2, fits=8)
    cut = t2.fit()
    assert t2.interrupted and load_checkpoint(cut, prefer="last")["oom"]["micro_batch"] == 8
    resumed = Trainer(resume=cut)
    assert resumed.oom.micro_batch == 8
    resumed.fit()
    for k, v in _weights(run).items():
        assert torch.equal(_weights(cut)[k], v), k


def test_batch_size_auto_on_cpu_uses_the_default_and_the_run_keeps_the_number(tmp_path, caplog):
    cfg = load_config(None, [*PLAIN, "data.batch_size=auto", "train.max_steps=2", f"run.dir={tmp_path}",
                             "run.name=auto"])
    t = Trainer(cfg)
    assert t.cfg.data.batch_size == CPU_BATCH_SIZE and t.oom.batch_size == CPU_BATCH_SIZE
    with caplog.at_level("INFO", logger="vitforge"):
        run = t.fit()
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["batch_size"] == CPU_BATCH_SIZE
    assert load_checkpoint(run, prefer="last")["config"]["data"]["batch_size"] == CPU_BATCH_SIZE
    announce = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run ")]
    assert len(announce) == 1 and announce[0].endswith(f" | data.batch_size=auto: no memory search on cpu; "
                                                       f"using {CPU_BATCH_SIZE}")
    assert Trainer(resume=run).cfg.data.batch_size == CPU_BATCH_SIZE
