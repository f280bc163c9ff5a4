"""Which autocast precision keeps the selection closest to fp32: the share of selected tokens (per image, layer
and head) that ``FrozenLPM`` under bf16 and fp16 autocast has in common with the fp32 full-softmax reference, on
whatever device this runs (autocast works on a CPU too, slowly). The figure behind ``--precision``'s default.

    python -m fpt.bench.precision --model vit_base_patch16_224 --res 512 --images 2
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from fpt.bench.common import command_line, write_results
from fpt.bench.gpu import TOKEN_RATIO, _device, _images, selection_agreement


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from fpt.extract.backbone import FrozenLPM, create_backbone
    from fpt.extract.run import default_layers

    device = _device()
    net, info = create_backbone(args.model, args.res, random_init=True)
    lpm = FrozenLPM(net, default_layers(info.depth), TOKEN_RATIO, "global").to(device)
    x = _images(args.res, args.images, device)
    rows = []
    for precision in ("bf16", "fp16"):
        start = time.perf_counter()
        agreement = selection_agreement(lpm, x, device, precision)
        rows.append({"precision": precision, "selection_agreement": agreement,
                     "seconds": round(time.perf_counter() - start, 2)})
        print(rows[-1], flush=True)
    out = write_results(f"precision-{device.type}-{args.model}-{args.res}", "fpt.bench.precision", cases=rows,
                        device=str(device), images=args.images, command=command_line("fpt.bench.precision"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
