"""Pretraining throughput of the official TimeMAE research code, for comparison (same machine).

The official code is not part of this project: clone it yourself and point ``--official-dir`` at
the checkout (measured against commit 7e285fa of https://github.com/Mingyue-Cheng/TimeMAE):

    git clone https://github.com/Mingyue-Cheng/TimeMAE /tmp/TimeMAE-official
    python benchmarks/bench_official.py --official-dir /tmp/TimeMAE-official --threads 2 --json

It builds ``model.TimeMAE.TimeMAE(args)`` with the official HAR settings (``args.py`` defaults,
which ``run.sh`` repeats for HAR: d_model 64, 8 layers x 4 heads, wave_length 8, mask ratio 0.6,
4 regressor layers, vocab 192, dropout 0.2, batch 128, AdamW lr 1e-3) on 9 x 128 windows and
runs the official ``process.Trainer.pretrain`` loop itself, unmodified, for one epoch of
``warmup + steps`` random batches; the clock is read before each batch is fetched, so a step is
the official loop body (forward, MSE + label-smoothed CE with its hit/NDCG metrics and ``.item()``
calls, backward, AdamW step, momentum update). Compare with
``python benchmarks/bench_pretrain.py`` (Ray + DeepSpeed) or ``timemae pretrain --single-process``.

Harness-side shims (the official files are imported as they are):

* ``classification`` is replaced by a stub: the real one does ``from args import args``, which
  parses ``sys.argv`` and loads HAR from disk at import time; its functions only serve the
  every-5-epochs linear probe, which a 1-epoch run never reaches;
* ``args.py`` is not imported for the same reason: an ``argparse.Namespace`` with its defaults is
  built here, plus what ``main.py`` derives from the data (``data_shape=(128, 9)``, ``num_class=6``);
* ``main.py``'s ``torch.set_num_threads(12)`` is replaced by ``--threads``.

The official code's console output goes to stderr; with ``--json`` the last stdout line is
``{"threads": N, "step_ms": ..., "windows_per_s": ..., "cpu": {...}}`` (``cpu``: timemae_dist.hostinfo.cpu_info).
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: the official modules come first
from timemae_dist.hostinfo import cpu_info  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument('--official-dir', required=True,
                   help="a checkout of https://github.com/Mingyue-Cheng/TimeMAE (holds model/TimeMAE.py, process.py)")
    p.add_argument('--json', action='store_true', help="print only the JSON summary on stdout")
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--steps', type=int, default=40)
    p.add_argument('--warmup', type=int, default=10)
    p.add_argument('--loader', action='store_true',
                   help="feed batches through the official dataset.Dataset + "
                        "torch DataLoader(shuffle=True) as main.py does (adds "
                        "per-sample torch.tensor + collate cost); default feeds "
                        "pre-built [x, y] batches")
    p.add_argument('--seed', type=int, default=3407)
    return p.parse_args()


def official_args(save_path):
    # args.py defaults (run.sh for HAR passes the same values)
    return argparse.Namespace(
        save_path=save_path, dataset='har', UCR_folder='PhonemeSpectra',
        data_path='data/HAR/', device='cpu', train_batch_size=128, test_batch_size=128,
        d_model=64, dropout=0.2, attn_heads=4, eval_per_steps=16, enable_res_parameter=1,
        layers=8, alpha=5.0, beta=1.0, momentum=0.99, vocab_size=192, wave_length=8,
        mask_ratio=0.6, reg_layers=4, lr=0.001, lr_decay_rate=1., lr_decay_steps=100,
        weight_decay=0.01, num_epoch_pretrain=1, num_epoch=1, load_pretrained_model=1,
        # derived in args.py / main.py from the HAR data:
        num_class=6,            # len(set(Train_data[1])) for HAR
        data_shape=(128, 9),    # train_dataset.shape(): (time, channels)
    )


class TimedIterable:
    """Wraps the loader; stamps the clock right before each batch is fetched,
    so t[i+1]-t[i] = fetch of batch i + the whole official loop body for it."""

    def __init__(self, inner):
        self.inner = inner
        self.t = []

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        it = iter(self.inner)
        while True:
            self.t.append(time.perf_counter())
            try:
                b = next(it)
            except StopIteration:
                return
            yield b


def main():
    cli = parse()
    official = os.path.abspath(os.path.expanduser(cli.official_dir))
    needed = ("model/TimeMAE.py", "model/layers.py", "process.py", "loss.py")
    missing = [f for f in needed if not os.path.isfile(os.path.join(official, f))]
    if missing:
        sys.exit(f"bench_official: --official-dir {official!r} is not a TimeMAE checkout (no {', '.join(missing)}); "
                 "git clone https://github.com/Mingyue-Cheng/TimeMAE and pass its folder")
    sys.path.insert(0, official)
    torch.set_num_threads(cli.threads)
    torch.manual_seed(cli.seed)
    np.random.seed(cli.seed)
    import random
    random.seed(cli.seed)

    stub = types.ModuleType('classification')

    def _unused(*a, **k):
        raise RuntimeError('linear-probe eval is not part of the timed pretraining step')
    stub.fit_lr = _unused
    stub.get_rep_with_label = _unused
    sys.modules['classification'] = stub

    from model.TimeMAE import TimeMAE
    from process import Trainer

    total = cli.warmup + cli.steps
    bs = 128
    T, C = 128, 9
    tmp = tempfile.TemporaryDirectory(prefix='timemae-official-')  # the official trainer writes logs here
    save_path = tmp.name
    args = official_args(save_path)

    if cli.loader:
        from dataset import Dataset
        import torch.utils.data as Data
        data = [np.random.randn(total * bs, T, C).astype(np.float32),
                np.random.randint(0, args.num_class, size=total * bs).astype(np.int64)]
        ds = Dataset(device=args.device, mode='pretrain', data=data, wave_len=args.wave_length)
        assert tuple(ds.shape()) == args.data_shape
        inner = Data.DataLoader(ds, batch_size=args.train_batch_size, shuffle=True)
    else:
        pool = [[torch.randn(bs, T, C), torch.randint(0, args.num_class, (bs,))]
                for _ in range(min(total, 16))]
        inner = [pool[i % len(pool)] for i in range(total)]
    loader = TimedIterable(inner)

    with contextlib.redirect_stdout(sys.stderr):
        model = TimeMAE(args)
        trainer = Trainer(args, model, loader, None, None, verbose=True)
        trainer.pretrain()   # official loop: 1 epoch over `total` batches

    t = loader.t
    assert len(t) == total + 1, (len(t), total)
    elapsed = t[total] - t[cli.warmup]
    step_ms = elapsed / cli.steps * 1000.0
    tmp.cleanup()
    result = {"threads": cli.threads, "step_ms": round(step_ms, 3),
              "windows_per_s": round(cli.steps * bs / elapsed, 2), "cpu": cpu_info()}
    if not cli.json:
        print(f'official TimeMAE pretraining, {"official DataLoader" if cli.loader else "pre-built batches"}, '
              f'batch {bs}, {cli.threads} thread(s): {result["step_ms"]:.1f} ms/step, '
              f'{result["windows_per_s"]:,.0f} windows/s ({cli.steps} steps after {cli.warmup} warm-up)')
    print(json.dumps(result))


if __name__ == '__main__':
    main()
