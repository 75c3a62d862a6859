"""Which decoder should the inverse network build at a cut: the dense one or the convolutional one?

``build_decoder``'s ``auto`` rule (``wants_dense_decoder``, the ``auto`` column) gives the fully connected decoder to
flat features and to feature maps at a third of the resolution or less of small images (digits), the convolutional
one to every other map. The cases this benchmark measured set that rule; the one before it, chosen on MNIST's
``ReLU2`` alone (``benchmarks/decoders.py``), gave the dense decoder to every map at half the resolution or less,
which reconstructs little more than the mean image at CIFAR-10's pooled cuts. This benchmark trains both kinds
(``kind="dense"`` and ``kind="conv"``) through the one attack pipeline (``fit_attack``, the inverse network with
everything else at its defaults) at each given cut of a trained model, with the same auxiliary images, steps and
seed, and scores both on the first test image of each class (He et al.'s protocol), with the time of each as a
ratio to the dense one.

    python benchmarks/decoder_choice.py --data cifar10 --model cifar-cnn \\
        --checkpoint benchmarks/results/artifacts/targets/HASH --points pool1,conv31
    python benchmarks/decoder_choice.py --data mnist --model lenet --checkpoint LENET --points pool1,ReLU2,pool2
    ... --budget full     # 3,000 steps on every auxiliary image instead of the advisor's fast budget

Models come from checkpoints (``splitshield train``, the engine's targets, ``benchmarks/advisor_validity.py``'s
cache): nothing is trained here. Data: ``--data-dir`` (``../shared/data``; CIFAR-10 there is JPEG quality 75).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import splitshield as ss
from splitshield.advisor.leakage import held_out_index
from splitshield.attacks.decoders import build_decoder, dense_width, wants_dense_decoder
from splitshield.measure import attack_seed, fit_attack
from splitshield.metrics import psnr, ssim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args  # noqa: E402

#: (auxiliary images, steps, batch size): the advisor's fast black-box budget, and the validity benchmark's full one
#: (every auxiliary image, the inverse network's default batch size).
BUDGETS = {"fast": (512, 300, 32), "full": (None, 3000, None)}
KINDS = ("dense", "conv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--data", default="cifar10", help="dataset name (load_dataset)")
    parser.add_argument("--model", required=True, help="zoo name of the checkpoint's model")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the trained, undefended model")
    parser.add_argument("--points", required=True, help="comma-separated split points")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="fast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = ss.load_dataset(args.data, data_dir=args.data_dir, seed=args.seed)
    shape = tuple(data.image_shape)
    net = ss.build_model(args.model, num_classes=data.num_classes, input_shape=shape, seed=args.seed)
    try:
        ss.load_checkpoint(args.checkpoint, model=net)
    except ss.SplitShieldError as exc:
        sys.exit(f"--checkpoint {args.checkpoint}: {exc}")
    x, _ = data.test.subset(held_out_index(data.test, data.num_classes)).tensors(args.device)
    aux_n, steps, batch = BUDGETS[args.budget]
    hidden = dense_width(aux_n or len(data.holdout))
    print(f"{args.model} on {data.name}, {args.budget} budget ({steps} steps on {aux_n or len(data.holdout)} "
          f"auxiliary images); first test image of each class; SSIM (7×7 uniform window)")
    print(f"{'point':14} {'feature':14} {'auto':5} | {'dense SSIM':>10} {'PSNR':>6} | {'conv SSIM':>9} {'PSNR':>6} "
          f"{'time conv/dense':>15}")
    for point in args.points.split(","):
        target = ss.split(net, point, input_shape=shape).eval()
        feature = tuple(target.head(x[:1]).shape[1:])
        scores = {}
        for kind in KINDS:
            torch.manual_seed(args.seed)  # the decoder's initialisation: the attack copies the module it is given
            params = {"steps": steps, "decoder": build_decoder(feature, shape, hidden=hidden, kind=kind)}
            if batch is not None:
                params["batch_size"] = batch
            setting = {"name": "inverse_network", "threat": "black_box", "aux": "same_distribution",
                       "aux_n": aux_n, "adaptive": True, "params": params}
            # Both kinds get the same seed: the same auxiliary images, queries and batch order.
            seed = attack_seed(args.seed, {**setting, "params": {"steps": steps}})
            start = time.perf_counter()
            fitted = fit_attack(target, None, data, setting, images=1, seed=seed)
            x_hat = fitted.attack.invert(fitted.victim.observe(x)).detach()
            scores[kind] = (float(ssim(x_hat, x)), float(psnr(x_hat, x)), time.perf_counter() - start)
        auto = "dense" if wants_dense_decoder(feature, shape) else "conv"
        (ds, dp, dt), (cs, cp, ct) = scores["dense"], scores["conv"]
        print(f"{point:14} {'×'.join(map(str, feature)):14} {auto:5} | {ds:10.3f} {dp:6.2f} | {cs:9.3f} {cp:6.2f} "
              f"{ct / dt:15.2f}", flush=True)


if __name__ == "__main__":
    main()
