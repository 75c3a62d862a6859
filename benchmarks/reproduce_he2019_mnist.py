"""Reproduce He et al. (ACSAC 2019) Tables 3, 4 and 6 on full MNIST, LeNet at conv1 and ReLU2.

Prints our PSNR/SSIM beside the paper's for the white-box (rMLE), black-box (inverse network, three
kinds of auxiliary data) and query-free (shadow head, same/different net and data) attacks, on the
paper's 10-image protocol (first test image of each class) and on the first N test images. The query-free
shadow also matches the moments of the traffic (the features of 1,000 test images outside both protocols),
which He et al.'s does not.

    python benchmarks/reproduce_he2019_mnist.py [--n-large 1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import splitshield as ss
from splitshield import metrics
from splitshield.attacks.base import TRAFFIC_IMAGES

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import add_common_args, trained_lenet  # noqa: E402

# (attack label) -> {split: (PSNR, SSIM)} from the paper's Tables 3, 4 and 6 (ALGORITHMS.md §A.6).
PAPER = {
    "white-box": {"conv1": (39.69, 0.9969), "ReLU2": (15.10, 0.5998)},
    "black-box same set": {"conv1": (39.64, 0.9887), "ReLU2": (20.35, 0.7334)},
    "black-box same dist": {"conv1": (40.72, 0.9950), "ReLU2": (20.81, 0.8046)},
    "black-box rand set": {"conv1": (14.76, 0.7188), "ReLU2": (7.72, 0.4310)},
    "query-free same set, same net": {"conv1": (17.60, 0.7423), "ReLU2": (9.61, 0.4981)},
    "query-free diff set, same net": {"conv1": (21.53, 0.9121), "ReLU2": (9.27, 0.4652)},
    "query-free same set, diff net": {"conv1": (12.59, 0.6430), "ReLU2": (8.05, 0.3790)},
    "query-free diff set, diff net": {"conv1": (17.86, 0.6952), "ReLU2": (8.03, 0.3226)},
}


def attacks(args: argparse.Namespace):
    bb, qf = args.decoder_steps, args.shadow_steps
    yield "white-box", "white_box", None, lambda: ss.WhiteBoxInversion(iters=args.iters, progress=False)
    for label, aux in (("same set", "same_set"), ("same dist", "same_distribution"), ("rand set", "noise")):
        yield (f"black-box {label}", "black_box", aux,
               lambda: ss.InverseNetwork(steps=bb, seed=args.seed, progress=False))
    for data_label, aux in (("same set", "same_set"), ("diff set", "same_distribution")):
        for net_label, shadow in (("same net", "same"), ("diff net", "different")):
            yield (f"query-free {data_label}, {net_label}", "query_free", aux,
                   lambda s=shadow: ss.QueryFreeInversion(shadow=s, steps=qf, iters=args.iters, seed=args.seed,
                                                          progress=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5000, help="rMLE iterations (He et al.: 5000)")
    parser.add_argument("--decoder-steps", type=int, default=6000)
    parser.add_argument("--shadow-steps", type=int, default=4000)
    parser.add_argument("--n-large", type=int, default=1000, help="second protocol: the first N test images")
    parser.add_argument("--splits", nargs="+", default=["conv1", "ReLU2"], choices=["conv1", "ReLU2"])
    parser.add_argument("--quick", action="store_true", help="tiny budgets, to check the script runs")
    parser.add_argument("--json", type=str, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.iters, args.decoder_steps, args.shadow_steps, args.n_large = 1, 50, 50, 50, 50
    torch.set_num_threads(args.threads)
    print("command:", " ".join(sys.argv), "| settings:", vars(args), flush=True)

    data = ss.load_dataset("mnist", data_dir=args.data_dir, seed=args.seed)
    model, accuracy, seconds = trained_lenet(data, args.epochs, args.seed, args.device)
    print(f"LeNet: {len(data.train)} training images, {args.epochs} epochs, test accuracy {accuracy:.2%} "
          f"({seconds:.0f} s)", flush=True)
    x10, _ = data.test.first_per_class()
    xn, _ = data.test.take(args.n_large).tensors()
    # Other users' features the cloud has seen; the query-free shadow matches their moments (He et al.'s does not).
    _, traffic = ss.data.evaluation_split(data.test, args.n_large, TRAFFIC_IMAGES)
    rows = []
    header = (f"{'split':6} {'attack':32} {'paper PSNR/SSIM':>16} | {'ours 10 img':>15} | "
              f"{'ours ' + str(args.n_large) + ' img':>15} | {'Δ PSNR':>7} {'s':>6}")
    print(header)
    print("-" * len(header))
    for point in args.splits:
        target = ss.split(model, point, input_shape=data.image_shape)
        for label, threat, aux_kind, make in attacks(args):
            aux = data.aux(aux_kind, n=len(data.holdout) if aux_kind == "noise" else None) if aux_kind else None
            victim = ss.Victim(target, threat=threat, aux=aux, seed=args.seed, traffic=traffic)
            start = time.perf_counter()
            attack = make().fit(victim)
            scores = []
            for x in (x10, xn):
                x = x.to(args.device)
                x_hat = torch.cat([attack.invert(victim.observe(x[i:i + 250])) for i in range(0, len(x), 250)])
                scores.append((float(metrics.psnr(x_hat, x)), float(metrics.ssim(x_hat, x))))
            elapsed = time.perf_counter() - start
            paper = PAPER[label][point]
            rows.append({"split": point, "attack": label, "paper": paper, "ours_10": scores[0],
                         f"ours_{args.n_large}": scores[1], "seconds": elapsed})
            print(f"{point:6} {label:32} {paper[0]:7.2f}/{paper[1]:.4f} | {scores[0][0]:6.2f}/{scores[0][1]:.4f} | "
                  f"{scores[1][0]:6.2f}/{scores[1][1]:.4f} | {scores[0][0] - paper[0]:+7.2f} {elapsed:6.0f}",
                  flush=True)
    beaten = sum(r["ours_10"][0] >= r["paper"][0] for r in rows)
    print(f"\nmodel accuracy {accuracy:.2%}; ours ≥ paper PSNR (10-image protocol) in {beaten}/{len(rows)} rows")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"accuracy": accuracy, "rows": rows, "settings": vars(args) | {"data_dir": str(args.data_dir)}},
                      fh, indent=2)


if __name__ == "__main__":
    main()
