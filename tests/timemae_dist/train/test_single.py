"""Single-process loop (plain PyTorch): losses go down, checkpoints save/load/resume, export."""

from __future__ import annotations

import math
import os

import pytest
import torch

from data_pipeline.loader import open_loader
from timemae_dist.model import TimeMAE
from timemae_dist.train.build import build_model
from timemae_dist.train.config import load_pretrain_config
from timemae_dist.train.export import export_checkpoint
from timemae_dist.train.preflight import resolve
from timemae_dist.train.single import run_single

from .conftest import TINY_CONFIG, tiny_overrides


def _eval_losses(model: TimeMAE, x: torch.Tensor) -> tuple[float, float]:
    """MRR and MCC losses on fixed windows with fixed masks/gumbel noise, dropout off."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    vals = []
    with torch.no_grad():
        for _ in range(8):
            out = model(x, generator=g)
            vals.append(torch.stack([out["loss_mrr"], out["loss_mcc"]]))
    mrr, mcc = torch.stack(vals).mean(0).tolist()
    return mrr, mcc


def test_single_process_reduces_losses_and_resumes(tiny_store, tmp_path, capsys):
    over = tiny_overrides(tiny_store, tmp_path, "single", "trainer.max_steps=60", "run.checkpoint_every=30", "run.log_every=20")
    cfg = load_pretrain_config(TINY_CONFIG, over)
    initial = build_model(resolve(cfg)[0])
    initial.attach_target_encoder()
    summary = run_single(cfg)
    assert summary["steps"] == 60 and summary["checkpoint"].endswith("checkpoint_0000060")
    assert "starting fresh" in capsys.readouterr().out.splitlines()[0]

    final = TimeMAE.from_pretrained(export_checkpoint(summary["checkpoint"], tmp_path / "export"))
    x = next(iter(open_loader(str(tiny_store), "val", 32, normalize=True, shuffle=False)))["x"]
    mrr0, mcc0 = _eval_losses(initial, x)
    mrr1, mcc1 = _eval_losses(final, x)
    assert mrr1 < 0.7 * mrr0, (mrr0, mrr1)
    assert mcc1 < mcc0 - 0.05, (mcc0, mcc1)

    # The same command with a larger budget resumes from the last checkpoint.
    more = load_pretrain_config(TINY_CONFIG, [*over[:-3], "trainer.max_steps=64", "run.log_every=2"])
    summary2 = run_single(more)
    first = capsys.readouterr().out.splitlines()[0]
    assert "resuming from" in first and "checkpoint_0000060" in first
    assert summary2["steps"] == 64 and summary2["steps_this_run"] == 4

    # Once more: nothing left to do, yet the summary names the run's checkpoint and its losses.
    summary3 = run_single(more)
    assert summary3["steps_this_run"] == 0 and summary3["steps"] == 64
    assert summary3["checkpoint"] == summary2["checkpoint"]
    assert summary3["final_loss"] == summary2["final_loss"] and math.isfinite(summary3["final_loss"])


def test_state_dict_round_trip(tiny_store, tmp_path):
    cfg = load_pretrain_config(TINY_CONFIG, tiny_overrides(tiny_store, tmp_path, "rt", "trainer.max_steps=2"))
    summary = run_single(cfg)
    out = export_checkpoint(tmp_path / "rt", tmp_path / "exp")  # a run dir resolves to its newest checkpoint
    model = TimeMAE.from_pretrained(out)
    again = TimeMAE(model.config)
    again.load_state_dict(model.state_dict())
    x = torch.randn(4, model.config.in_channels, model.config.seq_len)
    model.eval(), again.eval()
    torch.testing.assert_close(model.encode(x), again.encode(x), rtol=0, atol=0)
    assert summary["steps"] == 2


def test_periodic_linear_probe_logs_val_accuracy(tiny_store, tmp_path):
    """run.eval_every: rank 0 logs eval/linear_val_acc every N steps and at the end."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    over = tiny_overrides(tiny_store, tmp_path, "probe", "trainer.max_steps=5", "run.eval_every=2",
                          "run.checkpoint_every=0")
    summary = run_single(load_pretrain_config(TINY_CONFIG, over))
    assert summary["steps"] == 5
    acc = EventAccumulator(str(tmp_path / "probe" / "tb"))
    acc.Reload()
    events = acc.Scalars("eval/linear_val_acc")
    assert [e.step for e in events] == [2, 4, 5]
    assert all(0.0 <= e.value <= 1.0 for e in events)


def test_labelled_only_pretraining_reads_only_labelled_windows(tmp_path):
    from timemae_dist.train.build import build_loader

    from .conftest import write_store

    store = write_store(tmp_path / "half", n_train=256, unlabelled_every=2)
    base = tiny_overrides(store, tmp_path, "lab", "trainer.micro_batch_size=16")
    everything = build_loader(load_pretrain_config(TINY_CONFIG, base), rank=0, world_size=1)
    labelled = build_loader(load_pretrain_config(TINY_CONFIG, [*base, "data.labelled_only=true"]), rank=0, world_size=1)
    assert everything.num_batches == 16 and labelled.num_batches == 8
    labels = torch.cat([b["label"] for b in labelled])
    assert labels.numel() == 128 and bool((labels >= 0).all())
    assert bool((torch.cat([b["label"] for b in everything]) < 0).any())


def test_labelled_only_preflight_counts_labelled_windows(tmp_path):
    """The driver's plan (printed epoch size, step count, batch-fit check) uses the labelled windows."""
    from timemae_dist.train.errors import PretrainError
    from timemae_dist.train.preflight import resolve

    from .conftest import write_store

    store = write_store(tmp_path / "half", n_train=256, unlabelled_every=2)
    base = tiny_overrides(store, tmp_path, "lab", "trainer.micro_batch_size=16")
    _, plan_all = resolve(load_pretrain_config(TINY_CONFIG, base))
    _, plan_lab = resolve(load_pretrain_config(TINY_CONFIG, [*base, "data.labelled_only=true"]))
    assert (plan_all.num_windows, plan_all.batches_per_epoch) == (256, 16)
    assert (plan_lab.num_windows, plan_lab.batches_per_epoch) == (128, 8)
    # 128 labelled windows cannot fill a micro-batch of 200 (all 256 windows could)
    big = [*base, "trainer.micro_batch_size=200", "data.labelled_only=true"]
    with pytest.raises(PretrainError, match="micro_batch_size"):
        resolve(load_pretrain_config(TINY_CONFIG, big))


def test_cpu_dropout_option_switches_the_mask_path_for_the_run(tiny_store, tmp_path, capsys, monkeypatch):
    """trainer.cpu_dropout picks the C mask kernel or torch's eager masks for this run only; the
    same seed gives the same run on the same path, and the two paths draw different masks."""
    monkeypatch.delenv("TIMEMAE_CPU_DROPOUT", raising=False)
    losses = {}
    for name, mode in (("kernel1", "on"), ("eager", "off"), ("kernel2", "on")):
        over = tiny_overrides(tiny_store, tmp_path, name, "trainer.max_steps=3", "run.checkpoint_every=0",
                              "run.eval_every=0", f"trainer.cpu_dropout={mode}")
        losses[name] = run_single(load_pretrain_config(TINY_CONFIG, over))["final_loss"]
        out = capsys.readouterr().out
        want = "dropout masks: C kernel" if mode == "on" else "dropout masks: eager torch ops"
        assert want in out, out
        assert "TIMEMAE_CPU_DROPOUT" not in os.environ  # restored after the run
    assert losses["kernel1"] == losses["kernel2"] and math.isfinite(losses["kernel1"])
    assert losses["kernel1"] != losses["eager"]
    # the environment variable, where set, wins over the config
    monkeypatch.setenv("TIMEMAE_CPU_DROPOUT", "off")
    over = tiny_overrides(tiny_store, tmp_path, "env", "trainer.max_steps=3", "run.checkpoint_every=0",
                          "run.eval_every=0", "trainer.cpu_dropout=on")
    assert run_single(load_pretrain_config(TINY_CONFIG, over))["final_loss"] == losses["eager"]
    assert "eager torch ops" in capsys.readouterr().out and os.environ["TIMEMAE_CPU_DROPOUT"] == "off"


def test_cpu_fused_option_switches_the_fused_kernels_for_the_run(tiny_store, tmp_path, capsys, monkeypatch):
    """trainer.cpu_fused picks the fused kernels or the eager ops for this run only (the log says
    which, and when the model's heads do not fit the attention kernel); both train, and the
    environment variable, where set, wins."""
    from timemae_dist.kernels import cpu_fused

    monkeypatch.delenv("TIMEMAE_CPU_FUSED", raising=False)
    fused = cpu_fused.available("auto")
    for mode in ("on", "off"):
        if mode == "on" and not fused:
            continue
        over = tiny_overrides(tiny_store, tmp_path, f"attn_{mode}", "trainer.max_steps=3", "run.checkpoint_every=0",
                              "run.eval_every=0", f"trainer.cpu_fused={mode}", "model.d_model=32")  # 16-wide heads
        assert math.isfinite(run_single(load_pretrain_config(TINY_CONFIG, over))["final_loss"])
        out = capsys.readouterr().out
        label = "fused CPU kernels (attention core, residual LayerNorm, GELU, codeword draw)"
        want = f"{label}: C kernel" if mode == "on" else f"{label}: eager torch ops"
        assert want in out, out
        if mode == "on":  # and how the blocks run: one C call each way where torch's sgemm_ is there, or why not
            from timemae_dist.kernels import cpu_block

            assert f"; blocks: {cpu_block.one_call_status()[1]}" in out, out
        else:
            assert "blocks:" not in out
        assert "TIMEMAE_CPU_FUSED" not in os.environ  # restored after the run
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "off")
    over = tiny_overrides(tiny_store, tmp_path, "attn_env", "trainer.max_steps=1", "run.checkpoint_every=0",
                          "run.eval_every=0", "trainer.cpu_fused=on")
    run_single(load_pretrain_config(TINY_CONFIG, over))
    assert "GELU, codeword draw): eager torch ops (TIMEMAE_CPU_FUSED=off)" in capsys.readouterr().out
    assert os.environ["TIMEMAE_CPU_FUSED"] == "off"
    if fused:  # the tiny model's 8-wide heads: the log says the kernel does not take them
        monkeypatch.delenv("TIMEMAE_CPU_FUSED")
        over = tiny_overrides(tiny_store, tmp_path, "attn_narrow", "trainer.max_steps=1", "run.checkpoint_every=0",
                              "run.eval_every=0")
        run_single(load_pretrain_config(TINY_CONFIG, over))
        assert "this model: attention eager (heads 8 wide" in capsys.readouterr().out


def test_a_diverged_run_stops_with_one_error_and_keeps_its_good_checkpoints(tiny_store, tmp_path):
    """A non-finite loss (here forced with an absurd loss weight after a good start) stops the run
    at the first logging/checkpoint step that sees it, before anything non-finite is saved; the
    message names the step, the last good checkpoint and the fix; earlier checkpoints survive."""
    from timemae_dist.train.errors import PretrainError

    good = tiny_overrides(tiny_store, tmp_path, "div", "trainer.max_steps=8", "run.checkpoint_every=2",
                          "run.log_every=4", "run.eval_every=0", "run.keep_checkpoints=2")
    cfg = load_pretrain_config(TINY_CONFIG, [*good[:-5], "trainer.max_steps=8", "trainer.stop_after=2",
                                             "run.checkpoint_every=2", "run.log_every=4", "run.eval_every=0"])
    assert run_single(cfg)["steps"] == 2
    # same run, continued with a loss weight that overflows float32: inf loss from step 3 on
    bad = load_pretrain_config(TINY_CONFIG, [*good, "model.alpha=1e39"])
    with pytest.raises(PretrainError) as info:
        run_single(bad)
    msg = str(info.value)
    assert msg.startswith("step 4: training diverged (loss/total=") and "\n" not in msg, msg
    assert "checkpoint_0000002" in msg and "deepspeed.lr" in msg and "re-run the command" in msg
    assert sorted(p.name for p in (tmp_path / "div").glob("checkpoint_*")) == ["checkpoint_0000002"]


@pytest.mark.parametrize("var,key", [("TIMEMAE_CPU_FUSED", "cpu_fused"), ("TIMEMAE_CPU_DROPOUT", "cpu_dropout")])
def test_a_bad_kernel_variable_is_named_with_its_fix(tiny_store, tmp_path, monkeypatch, var, key):
    """The variable wins over the config key, so a bad value of it is named (not the key) with the fix."""
    from timemae_dist.train.build import kernel_env
    from timemae_dist.train.errors import PretrainError

    monkeypatch.setenv(var, "bogus")
    cfg = load_pretrain_config(TINY_CONFIG, tiny_overrides(tiny_store, tmp_path, "badvar"))
    with pytest.raises(PretrainError) as info:
        kernel_env(cfg)
    msg = str(info.value)
    assert msg.startswith(f"${var}: ") and f"set {var}=auto" in msg and f"trainer.{key}" in msg, msg
    monkeypatch.delenv(var)
    assert kernel_env(cfg)[var] == "auto"
